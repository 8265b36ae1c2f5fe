//! Table locks taken without waiting: a step that finds a table busy tries again later instead of
//! queueing every other user of the table behind it.
use std::time::Duration;

use pgrx::pg_sys;

/// Takes an ACCESS EXCLUSIVE lock on `relation`, held to the end of the transaction, trying `tries`
/// times `pause` apart; false when it stayed busy. Interrupts (cancel, shutdown) end the wait.
pub fn try_lock_exclusive(relation: pg_sys::Oid, tries: u32, pause: Duration) -> bool {
    for attempt in 0..tries {
        // SAFETY: a lock request on a relation by OID; on success the lock manager releases it at
        // transaction end, and on failure nothing is held.
        let locked = unsafe {
            pg_sys::ConditionalLockRelationOid(
                relation,
                pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE,
            )
        };
        if locked {
            return true;
        }
        if attempt + 1 < tries {
            // SAFETY: sleeps on this process's own latch, which lives as long as the process.
            unsafe {
                pg_sys::WaitLatch(
                    pg_sys::MyLatch,
                    (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                        as i32,
                    pause.as_millis().max(1) as std::ffi::c_long,
                    pg_sys::PG_WAIT_EXTENSION,
                );
                pg_sys::ResetLatch(pg_sys::MyLatch);
            }
            pgrx::check_for_interrupts!();
        }
    }
    false
}

/// Waits for an ACCESS EXCLUSIVE lock on `relation`, held to the end of the transaction, for as long
/// as lock_timeout allows (see `xact::waiting_at_most`). Requests of others that come meanwhile queue
/// behind this one.
pub fn lock_exclusive(relation: pg_sys::Oid) {
    // SAFETY: a lock request on a relation by OID; the lock manager releases it at transaction end,
    // and a timeout raises an error that leaves nothing held.
    unsafe { pg_sys::LockRelationOid(relation, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE) };
}
