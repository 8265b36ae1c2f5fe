//! The message table emptied and refilled with the rows live now, frozen: how the worker's compaction
//! gives back what a held snapshot keeps (`worker::compaction`, docs/design.md "Bloat under churn").
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::direct_insert::{
    self, close_indexes, flush, open_indexes, with_direct, Direct, ROWS_PER_FLUSH,
};
use super::{catalog, gucs};
use crate::error::BusResult;

/// Empties `bussig.message` (TRUNCATE: a new file, which no snapshot pins) and writes back every row
/// live now, frozen, in delivery order: a snapshot older than this sees the messages as they are once
/// it commits (later sends too, and no longer what was settled), as after COPY FREEZE. The caller
/// holds the table's ACCESS EXCLUSIVE lock: then no other transaction has a row in the table that is
/// not committed, and a snapshot taken now sees every message. False, with nothing done, when the
/// table needs the executor's INSERT (a trigger or a column bussig does not know) or holds more than
/// `max_rows` live rows or `max_bytes` of them: all are held in memory under the lock.
pub fn refill_message_table(max_rows: usize, max_bytes: usize) -> BusResult<bool> {
    if !direct_insert::writable() {
        return Ok(false);
    }
    let Some(rows) = live_rows(max_rows, max_bytes) else {
        return Ok(false);
    };
    // bussig's TRUNCATE trigger forgets every group: these messages keep theirs.
    gucs::with_superuser_setting(c"session_replication_role", c"replica", || {
        Spi::run("TRUNCATE bussig.message")
    })?;
    if !insert_frozen(&rows) {
        // The table changed under a lock nobody else can take: undo the TRUNCATE with the rest.
        pgrx::error!("bussig: the message table changed while it was refilled");
    }
    Ok(true)
}

/// A row and where it goes in delivery order: (queue, priority, ready at, id), priority descending.
type Keyed = ((i32, std::cmp::Reverse<i32>, i64, i64), pg_sys::HeapTuple);

/// Every row of `bussig.message` visible to a snapshot taken now (this transaction's own changes
/// too), in delivery order, copied with their out-of-line values brought in (TRUNCATE empties the
/// TOAST table with the rest); None past `max_rows` rows or `max_bytes`. In the current memory
/// context.
fn live_rows(max_rows: usize, max_bytes: usize) -> Option<Vec<pg_sys::HeapTuple>> {
    // SAFETY: inside a transaction that holds the table; the scan's snapshot is registered for its
    // length; every tuple read from a buffer is formed anew before the next is read, and its values
    // read at the positions of the table's own descriptor.
    unsafe {
        pg_sys::CommandCounterIncrement();
        let relation = pg_sys::table_open(
            catalog::bussig_relation(c"message"),
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        );
        let descriptor = (*relation).rd_att;
        let width = (*descriptor).natts as usize;
        let attributes = (*descriptor).attrs.as_slice(width);
        let position = |name: &std::ffi::CStr| {
            attributes.iter().position(|attribute| {
                !attribute.attisdropped
                    && std::ffi::CStr::from_ptr(attribute.attname.data.as_ptr()) == name
            })
        };
        // `writable` checked the columns: these are there, NOT NULL, of these types.
        let key_columns = [
            position(c"queue_id"),
            position(c"priority"),
            position(c"visible_at"),
            position(c"message_id"),
        ];
        let [Some(queue), Some(priority), Some(ready_at), Some(id)] = key_columns else {
            pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
            return None;
        };
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
        let mut rows: Vec<Keyed> = Vec::new();
        let mut bytes = 0usize;
        let within_bounds = loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break true;
            }
            if rows.len() >= max_rows || bytes > max_bytes {
                break false;
            }
            pg_sys::heap_deform_tuple(tuple, descriptor, values.as_mut_ptr(), nulls.as_mut_ptr());
            for (column, attribute) in attributes.iter().enumerate() {
                if attribute.attisdropped {
                    // What a dropped column kept may point into the TOAST table.
                    nulls[column] = true;
                } else if !nulls[column] && attribute.attlen == -1 {
                    let value = values[column].cast_mut_ptr::<pg_sys::varlena>();
                    // Out of line (VARATT_IS_EXTERNAL); a compressed inline value stays as it is.
                    if pgrx::varlena::varatt_is_1b_e(value) {
                        values[column] = pg_sys::Datum::from(pg_sys::detoast_external_attr(value));
                    }
                }
            }
            let formed =
                pg_sys::heap_form_tuple(descriptor, values.as_mut_ptr(), nulls.as_mut_ptr());
            bytes += (*formed).t_len as usize;
            let key = (
                values[queue].value() as i32,
                std::cmp::Reverse(values[priority].value() as i32),
                values[ready_at].value() as i64,
                values[id].value() as i64,
            );
            rows.push((key, formed));
        };
        pg_sys::heap_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        if !within_bounds {
            return None;
        }
        rows.sort_unstable_by_key(|(key, _)| *key);
        Some(rows.into_iter().map(|(_, row)| row).collect())
    }
}

/// Inserts `rows`, whole rows of `bussig.message` formed with its tuple descriptor and holding no
/// out-of-line values, frozen: visible to every snapshot once this transaction commits, as COPY
/// FREEZE writes them. Only into a table truncated earlier in this transaction, which no other
/// transaction can see until then. False when the table needs the executor (nothing written).
fn insert_frozen(rows: &[pg_sys::HeapTuple]) -> bool {
    // SAFETY: `write_rows` gets the relation and a target built for this very table; the caller
    // vouches for the rows.
    unsafe {
        with_direct(|relation, direct, _| {
            // As COPY FREEZE asks: rows frozen into a file other transactions may see would be
            // visible to them before this transaction commits.
            #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
            let new_file = (*relation).rd_newRelfilenodeSubid;
            #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
            let new_file = (*relation).rd_newRelfilelocatorSubid;
            let empty =
                pg_sys::RelationGetNumberOfBlocksInFork(relation, pg_sys::ForkNumber::MAIN_FORKNUM)
                    == 0;
            if new_file != pg_sys::GetCurrentSubTransactionId() || !empty {
                pgrx::error!(
                    "bussig: frozen rows go only into a table emptied in this subtransaction"
                );
            }
            write_rows(relation, direct, rows, pg_sys::HEAP_INSERT_FROZEN as i32)
        })
        .is_some()
    }
}

/// Writes whole rows with heap_multi_insert `options`, then their index entries.
unsafe fn write_rows(
    relation: pg_sys::Relation,
    direct: &mut Direct,
    rows: &[pg_sys::HeapTuple],
    options: i32,
) {
    // SAFETY: `relation` is open with an INSERT's lock and `direct` was built for it; the rows
    // were formed with its descriptor and outlive the call; each is stored in a slot without being
    // handed over, written with the current command id, and its index entries inserted before the
    // slot is cleared.
    unsafe {
        let result_relation = open_indexes(relation, direct, rows.len());
        let command = pg_sys::GetCurrentCommandId(true);
        for chunk in rows.chunks(ROWS_PER_FLUSH) {
            for (slot, &row) in direct.slots.iter().zip(chunk) {
                pg_sys::ExecStoreHeapTuple(row, *slot, false);
            }
            flush(
                relation,
                direct,
                result_relation,
                (chunk.len(), command, options),
                None,
            );
        }
        close_indexes(direct);
    }
}
