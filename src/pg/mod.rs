//! PostgreSQL glue: what bussig registers with the server, and the modules that call its C API
//! beyond SPI. Everything is registered here, from `_PG_init`.
//!
//! What a backend keeps, and what clears it:
//!
//! | kept                                   | where                     | cleared by                                  |
//! |----------------------------------------|---------------------------|---------------------------------------------|
//! | kept statements, up to 16 limits each  | `plans`                   | the plan cache re-plans them after DDL      |
//! | queues by name (`queue::Queue`)        | `queue`                   | a change of any queue (`invalidation`)      |
//! | subscriptions as a pattern trie        | `topic::routes`           | a change of subscriptions or queues         |
//! | the message table's relation and file  | `direct_insert`           | a relcache invalidation of the table        |
//! | read positions in backlogs             | `message::read_position`  | their lifetime, a short read, an abort      |
//! | depth changes of this transaction      | `depth`                   | its commit (applied) or abort (dropped)     |
//! | queues to wake and NOTIFY at commit    | `wakeup`                  | its commit (sent) or abort (dropped)        |
//! | the lock token generator               | `api::lock_token`         | nothing: seeded once per backend            |
pub mod arrivals;
pub mod background;
pub mod catalog;
pub mod datum;
pub mod direct_insert;
pub mod gucs;
pub mod heap;
pub mod identity;
mod index_pins;
pub mod invalidation;
pub mod locks;
pub mod planner;
pub mod positions;
pub mod refill;
pub mod shmem;
pub mod snapshot;
pub mod wakeup;
pub mod xact;

use pgrx::pg_sys;

/// Everything bussig registers: settings, shared memory, planner hooks, transaction callbacks and
/// the background worker's launcher.
pub fn init() {
    gucs::register();
    // SAFETY: a plain read of a flag the postmaster sets while it loads preloaded libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        // SAFETY: this is _PG_init while shared_preload_libraries is processed, and the only call.
        unsafe {
            wakeup::request_shared_memory();
            arrivals::request_shared_memory();
            positions::request_shared_memory();
            crate::depth::request_shared_memory();
        }
    }
    planner::init();
    xact::register();
    crate::worker::register();
}

/// This backend's process id.
pub fn my_pid() -> i32 {
    // SAFETY: set once when the process starts, and only read after.
    unsafe { pg_sys::MyProcPid }
}

/// The database this backend is connected to; InvalidOid before it connects (the launcher).
pub fn my_database() -> pg_sys::Oid {
    // SAFETY: set once when the backend connects, and only read after.
    unsafe { pg_sys::MyDatabaseId }
}

/// Fills `bytes` from the server's strong random source: false when it has none to give.
pub fn strong_random(bytes: &mut [u8]) -> bool {
    // SAFETY: the buffer is ours and exactly `bytes.len()` bytes long.
    unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) }
}
