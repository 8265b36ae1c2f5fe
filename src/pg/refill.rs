//! The message table emptied and refilled with the rows live now, frozen: how the worker's compaction
//! gives back what a held snapshot keeps (`worker::compaction`, docs/design.md).
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::{catalog, direct_insert, gucs};
use crate::error::BusResult;

/// Empties `bussig.message` (TRUNCATE: a new file, which no snapshot pins) and writes back every row
/// live now, frozen, so that every snapshot, an older one too, sees each message as before. The
/// caller holds the table's ACCESS EXCLUSIVE lock: then no other transaction has a row in the table
/// that is not committed, and a snapshot taken now sees every message. False, with nothing done, when
/// the table needs the executor's INSERT (a trigger or a column bussig does not know).
pub fn refill_message_table() -> BusResult<bool> {
    if !direct_insert::writable() {
        return Ok(false);
    }
    let rows = live_rows();
    // bussig's TRUNCATE trigger forgets every group: these messages keep theirs.
    gucs::with_superuser_setting(c"session_replication_role", c"replica", || {
        Spi::run("TRUNCATE bussig.message")
    })?;
    if !direct_insert::insert_frozen(&rows) {
        // The table changed under a lock nobody else can take: undo the TRUNCATE with the rest.
        pgrx::error!("bussig: the message table changed while it was refilled");
    }
    Ok(true)
}

/// Every row of `bussig.message` visible to a snapshot taken now (this transaction's own changes
/// too), copied with their out-of-line values brought in: TRUNCATE empties the TOAST table with the
/// rest. In the current memory context.
fn live_rows() -> Vec<pg_sys::HeapTuple> {
    // SAFETY: inside a transaction that holds the table; the scan's snapshot is registered for its
    // length; every tuple read from a buffer is copied (formed anew) before the next is read.
    unsafe {
        pg_sys::CommandCounterIncrement();
        let relation = pg_sys::table_open(
            catalog::bussig_relation(c"message"),
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        );
        let descriptor = (*relation).rd_att;
        let width = (*descriptor).natts as usize;
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let scan = pg_sys::heap_beginscan(
            relation,
            snapshot,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            pg_sys::ScanOptions::SO_TYPE_SEQSCAN | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE,
        );
        let mut values = vec![pg_sys::Datum::from(0); width];
        let mut nulls = vec![false; width];
        let mut rows = Vec::new();
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            pg_sys::heap_deform_tuple(tuple, descriptor, values.as_mut_ptr(), nulls.as_mut_ptr());
            for (column, value) in values.iter_mut().enumerate() {
                let attribute = (*descriptor).attrs.as_slice(width)[column];
                if attribute.attisdropped {
                    // What a dropped column kept may point into the TOAST table.
                    nulls[column] = true;
                } else if !nulls[column] && attribute.attlen == -1 {
                    // Brings an out-of-line value in (and inflates a compressed one, which the
                    // insert compresses again when the row is large).
                    *value = pg_sys::Datum::from(pg_sys::pg_detoast_datum_packed(
                        value.cast_mut_ptr::<pg_sys::varlena>(),
                    ));
                }
            }
            rows.push(pg_sys::heap_form_tuple(
                descriptor,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            ));
        }
        pg_sys::heap_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        rows
    }
}
