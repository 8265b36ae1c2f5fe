//! Read positions in shared memory: one slot per bucket of queues, each a place in delivery order and
//! when it was first set, written and read without a lock (a sequence lock per slot: a reader that
//! sees a write under way, or one that happened while it read, takes the slot as empty). A position
//! is a hint that saves index steps; losing one to a collision costs a read from the head, never a
//! message (`message::read_position` says why).
use std::sync::atomic::{fence, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use super::shmem::{LockFree, ValidWhenZeroed, ZeroedLwLock};

const SLOTS: usize = 4096;

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

/// The queue's position, if its slot holds one for it and no write got in the way.
pub fn load(queue_id: i32) -> Option<Stored> {
    let (slot, database) = slot(queue_id);
    let before = slot.version.load(Ordering::Acquire);
    if before % 2 == 1 {
        return None;
    }
    let stored = slot.fields();
    let mine = slot.holds(database, queue_id);
    // The fields were read before the version is read again.
    fence(Ordering::Acquire);
    let settled = slot.version.load(Ordering::Relaxed) == before;
    (settled && mine && stored.since != 0).then_some(stored)
}

/// Writes attempted before a write gives up while others hold the slot (each takes a few dozen
/// instructions).
const WRITE_TRIES: u32 = 1_000;

/// Writes the queue's slot with what `change` makes of the position it holds for the queue (None:
/// empties it), once no other write holds the slot; gives up (writes nothing) if others keep it.
pub fn update(queue_id: i32, change: impl FnOnce(Option<Stored>) -> Option<Stored>) {
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
            return;
        }
        std::hint::spin_loop();
    };
    // The odd version is seen before any field written below.
    fence(Ordering::Release);
    let held = Some(slot.fields()).filter(|held| slot.holds(database, queue_id) && held.since != 0);
    let new = change(held);
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
}
