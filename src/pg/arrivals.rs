//! How many commits made messages arrive in each queue (ready or delayed), counted in shared memory
//! per bucket of queues. A waiting reader notes its queue's count before it reads. When the count has
//! not moved by the time the reader is registered to be woken, no commit came between its read and
//! its registration, and it sleeps without reading again; a commit that passes a woken reader by
//! tells by the count whether the reader's read can have seen it. Queues share buckets: a collision
//! costs a read, never a lost wake.
use std::sync::atomic::{AtomicU64, Ordering};

use super::shmem::{LockFree, ValidWhenZeroed, ZeroedLwLock};

const BUCKETS: usize = 4096;

pub struct Arrivals {
    buckets: [AtomicU64; BUCKETS],
}

// SAFETY: atomics at fixed places, no pointers: every process can use the table where the postmaster
// mapped it.
unsafe impl pgrx::PGRXSharedMemory for Arrivals {}
// SAFETY: all zeros is every count at zero.
unsafe impl ValidWhenZeroed for Arrivals {}
// SAFETY: every field is an atomic.
unsafe impl LockFree for Arrivals {}

static ARRIVALS: ZeroedLwLock<Arrivals> = ZeroedLwLock::new(c"bussig_arrivals");

/// # Safety
/// Call once, from _PG_init while shared_preload_libraries is processed.
pub(super) unsafe fn request_shared_memory() {
    // SAFETY: the caller's contract is `request`'s.
    unsafe { ARRIVALS.request() };
}

fn bucket(queue_id: i32) -> &'static AtomicU64 {
    let database = super::my_database().to_u32();
    let mixed = (u64::from(database) << 32 | u64::from(queue_id as u32))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    &ARRIVALS.unlocked().buckets[(mixed >> (64 - BUCKETS.trailing_zeros())) as usize]
}

/// The queue's count now; 0 without shared memory.
pub fn seen(queue_id: i32) -> u64 {
    if !super::wakeup::shared_memory() {
        return 0;
    }
    // Sequentially consistent with the registration of waiting readers (see `wakeup`).
    bucket(queue_id).load(Ordering::SeqCst)
}

/// A commit made messages arrive in the queue, and is visible to others already: the count after it.
pub(super) fn arrived(queue_id: i32) -> u64 {
    bucket(queue_id).fetch_add(1, Ordering::SeqCst) + 1
}
