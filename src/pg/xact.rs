//! The transaction callbacks, registered once: what a module noted during a transaction is applied
//! at its commit or dropped at its abort. Order matters: depth counts are applied before waiting
//! readers wake, so a reader that looks at the depth sees what woke it.
use pgrx::{pg_guard, pg_sys};

use super::wakeup;
use crate::depth;
use crate::message::read_position;

pub(super) fn register() {
    // SAFETY: called from _PG_init, once per process; the callbacks are plain functions that live as
    // long as the library (it is never unloaded), and take effect from the next transaction event.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_transaction_end), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subtransaction_end), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_transaction_end(
    event: pg_sys::XactEvent::Type,
    _argument: *mut std::ffi::c_void,
) {
    read_position::at_transaction_end(event);
    depth::at_transaction_end(event);
    wakeup::at_transaction_end(event);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subtransaction_end(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _argument: *mut std::ffi::c_void,
) {
    depth::at_subtransaction_end(event, subtransaction);
}

/// Whether this transaction reads with one snapshot throughout (REPEATABLE READ or SERIALIZABLE):
/// no statement in it can see what others commit later.
pub fn snapshot_is_fixed() -> bool {
    // SAFETY: a plain read of a backend-local setting.
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

/// This transaction's top-level id, or 0 when it has none (it wrote nothing).
pub fn top_transaction_id() -> u32 {
    // SAFETY: reads the transaction's state, which stays set until its end callbacks have run.
    unsafe { pg_sys::GetTopTransactionIdIfAny() }.into_inner()
}

/// Whether `xid` is this transaction or one of its subtransactions.
pub fn is_this_transaction(xid: u32) -> bool {
    // SAFETY: a look-up in this backend's own transaction state.
    unsafe { pg_sys::TransactionIdIsCurrentTransactionId(xid.into()) }
}
