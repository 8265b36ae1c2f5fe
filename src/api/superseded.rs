//! Reads skip row versions that another transaction has taken. A reader whose snapshot predates another
//! consumer's commit still sees the message as ready; `FOR UPDATE` would follow it to its newest
//! version, lock that (a WAL record), recheck it and drop it, and hold the lock until the reader
//! commits, so that the other consumer's ack of the message waits for it. With several consumers on one
//! queue that happened for most messages read. A version another consumer is taking right now is
//! skipped too: `SKIP LOCKED` would skip it after trying its row lock, and with a hundred consumers a
//! read passed over hundreds of those.
use pgrx::{pg_extern, pg_sys};

/// Whether row `version` of table `relation` was updated or deleted by a committed transaction, or is
/// updated, deleted or row-locked by another transaction in progress. Only
/// for the rows bussig's own statements are scanning (not granted to PUBLIC): a block past the end
/// is an error, as checking for one cost a system call. False whenever the row does not plainly say
/// so, leaving the decision to `FOR UPDATE SKIP LOCKED`.
#[pg_extern(volatile, parallel_unsafe)]
fn superseded(relation: pg_sys::Oid, version: pg_sys::ItemPointerData) -> bool {
    crate::pg::heap::taken_by_another(relation, version)
}
