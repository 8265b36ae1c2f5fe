//! How many commits made messages arrive in each queue (ready or delayed), counted in shared memory
//! per bucket of queues. A waiting reader notes its queue's count before it reads. When the count has
//! not moved by the time the reader is registered to be woken, no commit came between its read and
//! its registration, and it sleeps without reading again; a commit that passes a woken reader by
//! tells by the count whether the reader's read can have seen it. Queues share buckets: a collision
//! costs a read, never a lost wake. Beside them, how many open transactions append to each stream.
use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use pgrx::pg_sys;

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

/// Open transactions that appended to a stream, counted per bucket of streams as arrivals are: while a
/// bucket's count is 0, every record whose id was drawn before is committed or rolled back for good
/// (see `stream::sequence`). A collision keeps a count up for longer, never down.
pub struct Appending {
    buckets: [AtomicU32; BUCKETS],
}

// SAFETY: as for `Arrivals`.
unsafe impl pgrx::PGRXSharedMemory for Appending {}
// SAFETY: all zeros is every count at zero.
unsafe impl ValidWhenZeroed for Appending {}
// SAFETY: every field is an atomic.
unsafe impl LockFree for Appending {}

static APPENDING: ZeroedLwLock<Appending> = ZeroedLwLock::new(c"bussig_appending");

thread_local! {
    /// The buckets this transaction counted itself in.
    static COUNTED_IN: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// # Safety
/// Call once, from _PG_init while shared_preload_libraries is processed.
pub(super) unsafe fn request_shared_memory() {
    // SAFETY: the caller's contract is `request`'s.
    unsafe {
        ARRIVALS.request();
        APPENDING.request();
    }
}

fn bucket_of(queue_id: i32) -> usize {
    let database = super::my_database().to_u32();
    let mixed = (u64::from(database) << 32 | u64::from(queue_id as u32))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> (64 - BUCKETS.trailing_zeros())) as usize
}

fn bucket(queue_id: i32) -> &'static AtomicU64 {
    &ARRIVALS.unlocked().buckets[bucket_of(queue_id)]
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

/// This transaction is about to append to the stream of wake key `key`: counted until it ends. Called
/// before the records draw their ids.
pub fn appending(key: i32) {
    if !super::wakeup::shared_memory() {
        return;
    }
    let index = bucket_of(key);
    COUNTED_IN.with(|counted| {
        let mut counted = counted.borrow_mut();
        if !counted.contains(&index) {
            APPENDING.unlocked().buckets[index].fetch_add(1, Ordering::SeqCst);
            counted.push(index);
        }
    });
}

/// Whether no open transaction appended to the stream of `key` (nor to one sharing its bucket); false
/// without shared memory. A prepared transaction is not counted: see `stream::sequence`.
pub fn none_appending(key: i32) -> bool {
    super::wakeup::shared_memory()
        && APPENDING.unlocked().buckets[bucket_of(key)].load(Ordering::SeqCst) == 0
}

/// Called by `xact` at each transaction event: at its end (or PREPARE), this transaction's appends are
/// no longer counted. Called after the commit became visible.
pub(super) fn at_transaction_end(event: pg_sys::XactEvent::Type) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PREPARE
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_PARALLEL_ABORT
    ) {
        for index in COUNTED_IN.with(|counted| std::mem::take(&mut *counted.borrow_mut())) {
            APPENDING.unlocked().buckets[index].fetch_sub(1, Ordering::SeqCst);
        }
    }
}
