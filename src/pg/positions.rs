//! Read positions in shared memory: one slot per bucket of queues, each a place in delivery order and
//! when it was first set, written and read without a lock (a sequence lock per slot: a reader that
//! sees a write under way, or one that happened while it read, takes the slot as empty). A position
//! is a hint that saves index steps; losing one to a collision costs a read from the head, never a
//! message (`message::read_position` says why).
//!
//! Each slot also counts its lowerings, and keeps the floors of the last few: a read raises a
//! position no further than the floor of any lowering since it loaded it, as that may be for a
//! message its snapshot missed.
use std::sync::atomic::{fence, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use super::shmem::{LockFree, ValidWhenZeroed, ZeroedLwLock};

const SLOTS: usize = 4096;
/// Lowerings whose floors a slot keeps: a read that loaded before more than these raises nothing.
const RECENT: usize = 8;

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
    /// Lowerings so far, wrapping; bumped under the sequence lock.
    lowered: AtomicU32,
    /// The floor of lowering n at `n % RECENT`: no message it was for is ready before it.
    floors: [AtomicI64; RECENT],
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
    /// The slot's lowerings when it was read: a later `raise` passes it back.
    pub lowered: u32,
}

/// The queue's position. Read before the reader's snapshot is taken: a commit that the snapshot
/// misses lowers the slot after this read, and so stops this reader's raise.
pub fn load(queue_id: i32) -> Loaded {
    let (slot, database) = slot(queue_id);
    let lowered = slot.lowered.load(Ordering::SeqCst);
    let before = slot.version.load(Ordering::Acquire);
    if before % 2 == 1 {
        return Loaded {
            stored: None,
            lowered,
        };
    }
    let stored = slot.fields();
    let mine = slot.holds(database, queue_id);
    // The fields were read before the version is read again.
    fence(Ordering::Acquire);
    let settled = slot.version.load(Ordering::Relaxed) == before;
    Loaded {
        stored: (settled && mine && stored.since != 0).then_some(stored),
        lowered,
    }
}

/// Writes attempted before a write gives up while others hold the slot (each takes a few dozen
/// instructions).
const WRITE_TRIES: u32 = 1_000;

/// Moves the queue's position on with what `change` makes of it and of the cap (a ready time) it
/// may move it to: in the position's priority, no further than the floor of a lowering since `seen`
/// (its `Loaded::lowered`); `i64::MAX` when none happened, `i64::MIN` when that is not known.
pub fn raise(queue_id: i32, seen: u32, change: impl FnOnce(Option<Stored>, i64) -> Option<Stored>) {
    write(queue_id, Write::Raise(seen), change);
}

/// Moves the queue's position back with what `change` makes of it (None: forgets it), and counts a
/// lowering of its slot even when the slot holds no position for it: a read that loaded it before
/// may not raise it past `floor` (a ready time; `i64::MIN` for no raise at all).
pub fn lower(queue_id: i32, floor: i64, change: impl FnOnce(Option<Stored>) -> Option<Stored>) {
    if !write(queue_id, Write::Lower(floor), |held, _| change(held)) {
        // Others kept the slot: the position stays, and no read that loaded it before raises it
        // (they find more lowerings than the slot keeps). What lies behind it waits for its
        // lifetime to run out.
        let slot = slot(queue_id).0;
        slot.lowered.fetch_add(RECENT as u32 + 1, Ordering::SeqCst);
    }
}

enum Write {
    /// A raise by a read that loaded the slot at this count of lowerings.
    Raise(u32),
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
    let lowered = slot.lowered.load(Ordering::SeqCst);
    let cap = match kind {
        Write::Raise(seen) => match lowered.wrapping_sub(seen) as usize {
            0 => i64::MAX,
            since @ 1..=RECENT => (1..=since)
                .map(|n| slot.floors[(seen as usize + n) % RECENT].load(Ordering::Relaxed))
                .min()
                .unwrap_or(i64::MIN),
            _ => i64::MIN,
        },
        Write::Lower(floor) => {
            let count = lowered.wrapping_add(1);
            slot.floors[count as usize % RECENT].store(floor, Ordering::Relaxed);
            slot.lowered.store(count, Ordering::SeqCst);
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
