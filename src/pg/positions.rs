//! Read positions in shared memory: one slot per bucket of queues, each a place in delivery order and
//! when it was first set, written and read without a lock (a sequence lock per slot: a reader that
//! sees a write under way, or one that happened while it read, takes the slot as empty). A position
//! is a hint that saves index steps; losing one to a collision costs a read from the head, never a
//! message (`message::read_position` says why).
//!
//! Each slot also keeps the lowest floor of the lowerings in each of its last few windows of time: a
//! read raises a position no further than the floor of any lowering since it loaded it, as that may
//! be for a message its snapshot missed. By time, not by count: a queue with thousands of sending
//! commits a second would pass any count between a read's load and its raise.
use std::sync::atomic::{fence, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use super::shmem::{LockFree, ValidWhenZeroed, ZeroedLwLock};

const SLOTS: usize = 4096;
/// Windows of lowerings a slot keeps, each `WINDOW_MICROS` long: a read that loaded its position
/// before them raises nothing.
const WINDOWS: usize = 16;
const WINDOW_MICROS: u64 = 50_000;

/// A position as stored: `since` is when it was first set, in microseconds of `now`, never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    pub priority: i32,
    pub ready_at: i64,
    pub message_id: i64,
    pub since: u64,
}

#[repr(C)]
struct Slot {
    /// Even when the slot is settled, odd while a write is under way.
    version: AtomicU32,
    database: AtomicU32,
    queue_id: AtomicU32,
    priority: AtomicU32,
    ready_at: AtomicI64,
    message_id: AtomicI64,
    /// 0: empty.
    since: AtomicU64,
    /// Window w (of `now`) is kept at `w % WINDOWS`: w + 1 (0: none yet), and the lowest floor of
    /// its lowerings. Written under the sequence lock.
    windows: [AtomicU64; WINDOWS],
    floors: [AtomicI64; WINDOWS],
    /// When a lowering last gave up on a slot others kept: reads that loaded before raise nothing.
    unwritten_lowering: AtomicU64,
}

impl Slot {
    /// The fields, as they are now: callers check the version around the read.
    fn fields(&self) -> Stored {
        Stored {
            priority: self.priority.load(Ordering::Relaxed) as i32,
            ready_at: self.ready_at.load(Ordering::Relaxed),
            message_id: self.message_id.load(Ordering::Relaxed),
            since: self.since.load(Ordering::Relaxed),
        }
    }

    /// The lowest floor of the lowerings from window `loaded_at / WINDOW_MICROS` to `window`.
    fn cap_since(&self, loaded_at: u64, window: u64) -> i64 {
        if self.unwritten_lowering.load(Ordering::SeqCst) >= loaded_at {
            return i64::MIN;
        }
        let first = loaded_at / WINDOW_MICROS;
        if window.saturating_sub(first) >= WINDOWS as u64 {
            return i64::MIN;
        }
        (first..=window)
            .filter(|&w| self.windows[w as usize % WINDOWS].load(Ordering::SeqCst) == w + 1)
            .map(|w| self.floors[w as usize % WINDOWS].load(Ordering::SeqCst))
            .min()
            .unwrap_or(i64::MAX)
    }

    /// Counts a lowering with `floor` in window `window`.
    fn lowered_in(&self, window: u64, floor: i64) {
        let at = window as usize % WINDOWS;
        if self.windows[at].load(Ordering::SeqCst) == window + 1 {
            self.floors[at].fetch_min(floor, Ordering::SeqCst);
        } else {
            self.floors[at].store(floor, Ordering::SeqCst);
            self.windows[at].store(window + 1, Ordering::SeqCst);
        }
    }

    fn holds(&self, database: u32, queue_id: i32) -> bool {
        self.database.load(Ordering::Relaxed) == database
            && self.queue_id.load(Ordering::Relaxed) == queue_id as u32
    }
}

pub struct Positions {
    slots: [Slot; SLOTS],
}

// SAFETY: atomics at fixed places, no pointers: every process can use the table where the postmaster
// mapped it.
unsafe impl pgrx::PGRXSharedMemory for Positions {}
// SAFETY: all zeros is every slot empty and settled.
unsafe impl ValidWhenZeroed for Positions {}
// SAFETY: every field is an atomic.
unsafe impl LockFree for Positions {}

static POSITIONS: ZeroedLwLock<Positions> = ZeroedLwLock::new(c"bussig_read_positions");

/// The instant every process measures `now` from: set in the postmaster, before it forks the
/// backends, which inherit it.
static EPOCH: OnceLock<Instant> = OnceLock::new();

/// # Safety
/// Call once, from _PG_init while shared_preload_libraries is processed.
pub(super) unsafe fn request_shared_memory() {
    EPOCH.get_or_init(Instant::now);
    // SAFETY: the caller's contract is `request`'s.
    unsafe { POSITIONS.request() };
}

/// Whether positions are shared: bussig was preloaded (which also set EPOCH).
pub fn shared() -> bool {
    super::wakeup::shared_memory()
}

/// Microseconds on a monotonic clock all backends share (they count from the postmaster's EPOCH);
/// never 0.
pub fn now() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    epoch.elapsed().as_micros() as u64 + 1
}

fn slot(queue_id: i32) -> (&'static Slot, u32) {
    let database = super::my_database().to_u32();
    let mixed = (u64::from(database) << 32 | u64::from(queue_id as u32))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let place = (mixed >> (64 - SLOTS.trailing_zeros())) as usize;
    (&POSITIONS.unlocked().slots[place], database)
}

/// What a read found in a queue's slot.
#[derive(Clone, Copy, Debug)]
pub struct Loaded {
    /// The queue's position, if its slot holds one for it and no write got in the way.
    pub stored: Option<Stored>,
    /// When it was read, in microseconds of `now`: a later `raise` passes it back.
    pub loaded_at: u64,
}

/// The queue's position. Read before the reader's snapshot is taken: a commit that the snapshot
/// misses lowers the slot after this read, and so stops this reader's raise.
pub fn load(queue_id: i32) -> Loaded {
    let (slot, database) = slot(queue_id);
    let loaded_at = now();
    let before = slot.version.load(Ordering::Acquire);
    if before % 2 == 1 {
        return Loaded {
            stored: None,
            loaded_at,
        };
    }
    let stored = slot.fields();
    let mine = slot.holds(database, queue_id);
    // The fields were read before the version is read again.
    fence(Ordering::Acquire);
    let settled = slot.version.load(Ordering::Relaxed) == before;
    Loaded {
        stored: (settled && mine && stored.since != 0).then_some(stored),
        loaded_at,
    }
}

/// Writes attempted before a write gives up while others hold the slot (each takes a few dozen
/// instructions).
const WRITE_TRIES: u32 = 1_000;

/// Moves the queue's position on with what `change` makes of it and of the cap (a ready time) it
/// may move it to: in the position's priority, no further than the floor of a lowering since
/// `loaded_at` (its `Loaded::loaded_at`); `i64::MAX` when none happened, `i64::MIN` when that is not
/// known.
pub fn raise(
    queue_id: i32,
    loaded_at: u64,
    change: impl FnOnce(Option<Stored>, i64) -> Option<Stored>,
) {
    write(queue_id, Write::Raise(loaded_at), change);
}

/// Moves the queue's position back with what `change` makes of it (None: forgets it), and counts a
/// lowering of its slot even when the slot holds no position for it: a read that loaded it before
/// may not raise it past `floor` (a ready time; `i64::MIN` for no raise at all).
pub fn lower(queue_id: i32, floor: i64, change: impl FnOnce(Option<Stored>) -> Option<Stored>) {
    if !write(queue_id, Write::Lower(floor), |held, _| change(held)) {
        // Others kept the slot: the position stays, and no read that loaded it before raises it.
        // What lies behind it waits for its lifetime to run out.
        let slot = slot(queue_id).0;
        slot.unwritten_lowering.fetch_max(now(), Ordering::SeqCst);
    }
}

enum Write {
    /// A raise by a read that loaded the slot at this `now`.
    Raise(u64),
    /// A lowering, with its floor.
    Lower(i64),
}

/// Writes the queue's slot with what `change` makes of the position it holds for the queue (None:
/// empties it) and of the cap on a raise, once no other write holds the slot; gives up (writes
/// nothing) if others keep it. Returns whether the slot was written.
fn write(
    queue_id: i32,
    kind: Write,
    change: impl FnOnce(Option<Stored>, i64) -> Option<Stored>,
) -> bool {
    let (slot, database) = slot(queue_id);
    let mut tries = 0;
    let before = loop {
        let before = slot.version.load(Ordering::Relaxed);
        if before % 2 == 0
            && slot
                .version
                .compare_exchange(before, before + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            break before;
        }
        tries += 1;
        if tries == WRITE_TRIES {
            return false;
        }
        std::hint::spin_loop();
    };
    // The odd version is seen before any field written below.
    fence(Ordering::Release);
    let window = now() / WINDOW_MICROS;
    let cap = match kind {
        Write::Raise(loaded_at) => slot.cap_since(loaded_at, window),
        Write::Lower(floor) => {
            slot.lowered_in(window, floor);
            i64::MIN
        }
    };
    let held = Some(slot.fields()).filter(|held| slot.holds(database, queue_id) && held.since != 0);
    let new = change(held, cap);
    // Writes to a slot of another queue only to put a position in it.
    if held.is_some() || new.is_some() {
        // since 0: empty.
        let new = new.unwrap_or(Stored {
            priority: 0,
            ready_at: 0,
            message_id: 0,
            since: 0,
        });
        slot.database.store(database, Ordering::Relaxed);
        slot.queue_id.store(queue_id as u32, Ordering::Relaxed);
        slot.priority.store(new.priority as u32, Ordering::Relaxed);
        slot.ready_at.store(new.ready_at, Ordering::Relaxed);
        slot.message_id.store(new.message_id, Ordering::Relaxed);
        slot.since.store(new.since, Ordering::Relaxed);
    }
    slot.version.store(before + 2, Ordering::Release);
    true
}
