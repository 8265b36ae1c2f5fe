//! Reads skip row versions that a committed transaction has already replaced. A reader whose snapshot
//! predates another consumer's commit still sees the message as ready; `FOR UPDATE` would follow it to
//! its newest version, lock that (a WAL record), recheck it and drop it, and hold the lock until the
//! reader commits, so that the other consumer's ack of the message waits for it. With several consumers
//! on one queue that happened for most messages read.
use pgrx::{pg_extern, pg_sys};

/// Whether row `version` of table `relation` was updated or deleted by a committed transaction. Only
/// for the rows bussig's own statements are scanning (not granted to PUBLIC): a block past the end
/// is an error, as checking for one cost a system call. False whenever the row does not plainly say
/// so, leaving the decision to `FOR UPDATE SKIP LOCKED`.
#[pg_extern(volatile, parallel_unsafe)]
fn superseded(relation: pg_sys::Oid, version: pg_sys::ItemPointerData) -> bool {
    crate::pg::heap::replaced_by_a_commit(relation, version)
}
