//! Numbering: records are appended without a seq; whoever reads a partition first gives the committed
//! ones the next numbers, in append order, under the partition's row lock (as PgQ's ticker closes a
//! batch of what committed). So numbers follow the order records become readable: one committing
//! later gets a higher seq than anything a reader could see before, a rollback leaves no gap, and an
//! open appending transaction holds back nobody (its records are not visible, so not numbered yet).
use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use super::Stream;
use crate::error::BusResult;
use crate::plans::{self, Statement};

// SKIP LOCKED: while another transaction numbers the partition, read what is numbered already.
static LOCK_PARTITION: Statement = Statement {
    sql: "SELECT head_seq FROM bussig.stream_partition WHERE stream_id = $1 AND partition = $2
          FOR UPDATE SKIP LOCKED",
    args: &[pg_sys::INT4OID, pg_sys::INT4OID],
    writes: true,
};

static SET_HEAD: Statement = Statement {
    sql: "UPDATE bussig.stream_partition SET head_seq = $3 WHERE stream_id = $1 AND partition = $2",
    args: &[pg_sys::INT4OID, pg_sys::INT4OID, pg_sys::INT8OID],
    writes: true,
};

/// Records waiting for a number, as many as a single pass numbers: a flood is numbered over several.
const PASS: i64 = 100_000;

/// The statement that numbers a partition's committed records after `$2`: its own, since it names
/// the stream's table. Run after the lock was taken, so it sees every record whose number the
/// previous holder committed, and every record committed before. The rows are found again by their
/// place (segment table and ctid): a join on record_id would be planned once, while the table was
/// empty, as a nested loop over every waiting record for each (minutes for 50,000 of them).
fn numbering(stream: &Stream) -> String {
    let table = stream.table();
    format!(
        "WITH waiting AS (
             SELECT w.tableoid AS segment_table, w.ctid AS place,
                    $2 + row_number() OVER (ORDER BY w.record_id) AS seq
             FROM (SELECT tableoid, ctid, record_id FROM {table}
                   WHERE partition = $1 AND seq IS NULL ORDER BY record_id LIMIT {PASS}) w
         )
         UPDATE {table} r SET seq = waiting.seq FROM waiting
         WHERE r.tableoid = waiting.segment_table AND r.ctid = waiting.place
         RETURNING r.seq"
    )
}

/// Numbers the partition's committed records; its head (last seq) after that, or None when another
/// transaction is numbering it right now.
pub fn number(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    partition: i32,
) -> BusResult<Option<i64>> {
    let args = [stream.stream_id.into(), partition.into()];
    let Some(head) = plans::first_value::<i64>(client, &LOCK_PARTITION, &args)? else {
        return Ok(None);
    };
    let sql = numbering(stream);
    let numbered = plans::run_text(
        client,
        &sql,
        &[pg_sys::INT4OID, pg_sys::INT8OID],
        true,
        &[partition.into(), head.into()],
    )?;
    let count = numbered.len() as i64;
    if count == 0 {
        return Ok(Some(head));
    }
    // Readers of other groups that found this partition being numbered, and read on without it,
    // are woken when these numbers commit, as an append's commit wakes them.
    crate::pg::wakeup::note_ready(super::wake_key(stream.stream_id), u32::MAX);
    let new_head = head + count;
    plans::run(
        client,
        &SET_HEAD,
        &[stream.stream_id.into(), partition.into(), new_head.into()],
    )?;
    Ok(Some(new_head))
}

/// Numbers every partition of the stream (those another transaction is numbering are left to it):
/// whether this transaction now holds every partition's row lock.
pub fn number_all(client: &mut SpiClient<'_>, stream: &Stream) -> BusResult<bool> {
    let mut all = true;
    for partition in 0..stream.partitions {
        all &= number(client, stream, partition)?.is_some();
    }
    Ok(all)
}
