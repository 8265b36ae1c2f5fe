//! The worker's compaction: a bloated table is rewritten with only its live rows, under a lock
//! taken when the table is free (or after a short wait), so that its file and indexes shrink back
//! where VACUUM would leave them at their peak size.
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::error::BusResult;
use crate::plans::{self, Statement};
// A table is worth a rewrite when it is over 8 MB with its indexes and at least nine tenths empty (live
// rows sized by a sample; the messages counted exactly by the statistics step just before, since the
// statistics system's estimate lags behind a bulk load and a rewrite of a large live set would hold
// the table's lock for long): then a rewrite keeps only live rows and gives the space back, where
// VACUUM would leave the file (and the indexes) at their peak size. The message table is rewritten in
// delivery order, so that reads find ready messages on few pages. Only a table of at most 40,000 live
// rows is rewritten: the rewrite holds every sender and reader of the table for about as long as it
// copies (measured with `make bench COMPACTION=1`: 52 ms at 20,000 live messages, 85 ms at 50,000,
// 808 ms at 200,000); a larger one is left to VACUUM, which makes its space reusable without
// shrinking the file.
//
// `held_back`: a transaction of this database older than 10 seconds could still see the dead rows
// (one with a transaction id, as a prepared one, holds them back without a snapshot; another
// database's transactions hold back none of this database's tables). CLUSTER keeps what any
// snapshot can see, so it would give nothing back; the message table is then emptied and refilled
// (`pg::refill`), and the body table waits. A plain VACUUM holds nothing back (a rewrite
// ignores it); ANALYZE does.
static COMPACTION_CANDIDATES: Statement = Statement {
    sql: "SELECT t.relid::oid, pg_relation_size(t.relid), t.live_rows::bigint, held_back.any
          FROM (VALUES
              ('bussig.message'::regclass,
               (SELECT avg(pg_column_size(m.*)) FROM (SELECT * FROM bussig.message LIMIT 100) m),
               (SELECT coalesce(sum(ready + delayed + locked), 0) FROM bussig.queue_stats)),
              ('bussig.body'::regclass,
               (SELECT avg(pg_column_size(b.*)) FROM (SELECT * FROM bussig.body LIMIT 100) b),
               -- The statistics system's count is gone after a crash or pg_stat_reset(), and a
               -- rewrite does not restore it: the count of the last VACUUM, ANALYZE or rewrite too.
               greatest(pg_stat_get_live_tuples('bussig.body'::regclass),
                        (SELECT c.reltuples::bigint FROM pg_class c WHERE c.oid = 'bussig.body'::regclass)))
          ) AS t(relid, row_width, live_rows),
          LATERAL (SELECT
              EXISTS (SELECT FROM pg_prepared_xacts p
                      WHERE p.prepared < clock_timestamp() - interval '10 seconds'
                        AND p.database = current_database())
              OR EXISTS (SELECT FROM pg_stat_activity a
                         WHERE (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
                           AND a.datname = current_database()
                           AND a.pid <> pg_backend_pid()
                           AND NOT (a.backend_type = 'autovacuum worker'
                                    AND a.query LIKE 'autovacuum: VACUUM %'
                                    AND a.query NOT LIKE '%ANALYZE%')
                           AND a.xact_start < clock_timestamp() - interval '10 seconds') AS any
          ) AS held_back
          WHERE pg_total_relation_size(t.relid) > 8 * 1024 * 1024
            AND pg_relation_size(t.relid) > 10 * t.live_rows * coalesce(t.row_width, 0)
            AND t.live_rows <= 40000",
    args: &[],
    // A writing statement: it must see the counts the statistics step wrote in this transaction.
    writes: true,
};

/// How a candidate table is rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rewrite {
    /// CLUSTER: keeps every row version a snapshot may still see.
    Cluster,
    /// The message table's live rows kept, the table truncated and the rows put back frozen
    /// (`pg::refill`): what a held snapshot keeps goes with the old file.
    Truncating,
}

/// CLUSTER statements by table.
fn cluster_statement(relid: pg_sys::Oid) -> &'static str {
    if relid == crate::pg::catalog::bussig_relation(c"message") {
        "CLUSTER bussig.message USING message_delivery_order"
    } else {
        "CLUSTER bussig.body USING body_pkey"
    }
}

/// The truncating rewrite holds senders and readers while it reads the file and inserts the live rows
/// in batches, index entry by index entry: fewer of them than CLUSTER takes.
const TRUNCATING_MAX_LIVE: i64 = 10_000;
/// The refill holds the rows in memory: it gives up (before it truncates anything) past twice that
/// many found, or this many bytes of them, the counts it was judged by being a round old.
const TRUNCATING_MAX_BYTES: usize = 64 << 20;

/// How `relid` can be rewritten now, if at all.
fn rewrite_for(relid: pg_sys::Oid, live_rows: i64, held_back: bool) -> Option<Rewrite> {
    if !held_back {
        return Some(Rewrite::Cluster);
    }
    (relid == crate::pg::catalog::bussig_relation(c"message") && live_rows <= TRUNCATING_MAX_LIVE)
        .then_some(Rewrite::Truncating)
}

static TOTAL_SIZE: Statement = Statement {
    sql: "SELECT pg_total_relation_size($1)",
    args: &[pg_sys::OIDOID],
    writes: true,
};

/// A table busy with senders and readers is free only for moments between their statements (waiting
/// readers hold no lock while they sleep): the compaction tries this often, this far apart, per round.
const COMPACTION_TRIES: u32 = 20;
const COMPACTION_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// Under a steady load of short transactions such a moment may not come for minutes; then the
/// compaction waits for the lock this long, and senders and readers that come meanwhile queue behind
/// it, for the wait and then the rewrite. Only for a table of at most `COMPACTION_WAIT_MAX_BYTES`:
/// the rewrite reads the whole file, dead rows not vacuumed yet too (a 174 MB table of a million
/// such rows and a thousand live ones took 246 ms, 35 ms once vacuumed), and a larger one would hold
/// them for longer than a stall worth taking.
const COMPACTION_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
const COMPACTION_WAIT_MAX_BYTES: i64 = 128 * 1024 * 1024;

/// Takes the lock for `relid`'s rewrite: when it is free, or after a short wait for a table small
/// enough to rewrite quickly that no long transaction holds. False, holding nothing, when it stayed
/// busy.
fn lock_for_rewrite(client: &mut SpiClient<'_>, relid: pg_sys::Oid, bytes: i64) -> BusResult<bool> {
    if crate::pg::locks::try_lock_exclusive(relid, COMPACTION_TRIES, COMPACTION_PAUSE) {
        return Ok(true);
    }
    if bytes > COMPACTION_WAIT_MAX_BYTES
        || plans::first_value::<bool>(client, &HELD_FOR_LONG, &[relid.into()])? != Some(false)
    {
        return Ok(false);
    }
    let locked = crate::pg::xact::waiting_at_most(client, COMPACTION_WAIT, |_| {
        crate::pg::locks::lock_exclusive(relid);
        Ok(())
    })?;
    Ok(locked.is_some())
}

/// After a rewrite, a table fills its new file again until VACUUM first frees space in it (under a steady
/// 800 messages/s, 8 MB within 20 s): within this long of a rewrite, the table is rewritten again only
/// once it is over twice its size before that rewrite, so that churn alone costs a rewrite's stall at
/// most this often, and a snapshot held meanwhile still gets its bloat taken back. Not longer: a
/// rewrite of a large churn's bloat would keep a smaller bloat of a held snapshot that follows from
/// being rewritten for as long (the full bench's workload 12 waited out 10 minutes after workload 11).
const REWRITE_CALM: std::time::Duration = std::time::Duration::from_secs(120);

thread_local! {
    /// Each table this backend rewrote: when, and its size before.
    static REWRITTEN: std::cell::RefCell<std::collections::HashMap<pg_sys::Oid, (std::time::Instant, i64)>> =
        Default::default();
}

/// Whether a table of `bytes` grew enough since this backend last rewrote it to be rewritten again.
fn grown_since_last_rewrite(relid: pg_sys::Oid, bytes: i64) -> bool {
    REWRITTEN.with(|rewritten| match rewritten.borrow().get(&relid) {
        Some((at, before)) if at.elapsed() < REWRITE_CALM => bytes > 2 * before,
        _ => true,
    })
}

// Whether any other transaction that began over a second ago holds a lock on the table: a short
// wait would not see it end, and would only stall the table's senders and readers (an idle
// transaction that once looked at the table holds it, without a snapshot or a transaction id).
static HELD_FOR_LONG: Statement = Statement {
    sql: "SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                         WHERE l.locktype = 'relation' AND l.relation = $1 AND l.granted
                           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                           AND l.pid <> pg_backend_pid()
                           AND a.xact_start < clock_timestamp() - interval '1 second')",
    args: &[pg_sys::OIDOID],
    writes: true,
};

/// Rewrites a bloated table, under a lock taken when it is free, or waited for briefly (see
/// `lock_for_rewrite`); the rewrite takes milliseconds for the few live rows. How many tables were
/// rewritten: one at most.
pub fn compact(client: &mut SpiClient<'_>) -> BusResult<i64> {
    let mut candidates = Vec::new();
    let scans = crate::pg::planner::whole_table_scans();
    for row in plans::run(client, &COMPACTION_CANDIDATES, &[])? {
        let relid: pg_sys::Oid = plans::filled(&row, 1, "table")?;
        let bytes: i64 = plans::filled(&row, 2, "table size")?;
        let live_rows: i64 = plans::filled(&row, 3, "live rows")?;
        let held_back: bool = plans::filled(&row, 4, "held back")?;
        if let Some(rewrite) = rewrite_for(relid, live_rows, held_back) {
            candidates.push((relid, rewrite, bytes));
        }
    }
    drop(scans);
    let mut compacted = 0;
    for (relid, rewrite, bytes) in candidates {
        let due = match rewrite {
            Rewrite::Cluster => grown_since_last_rewrite(relid, bytes),
            // While a snapshot is held, VACUUM frees nothing: the table grows for good, not only
            // until VACUUM catches up, so no calm period; the 8 MB floor spaces the rewrites out.
            // It reads the whole file under the lock: not a large one.
            Rewrite::Truncating => bytes <= COMPACTION_WAIT_MAX_BYTES,
        };
        if due && lock_for_rewrite(client, relid, bytes)? {
            let mut size = || -> BusResult<i64> {
                Ok(plans::first_value(client, &TOTAL_SIZE, &[relid.into()])?.unwrap_or(0))
            };
            let before = size()?;
            let started = std::time::Instant::now();
            let statement = match rewrite {
                Rewrite::Cluster => {
                    let statement = cluster_statement(relid);
                    Spi::run(statement)?;
                    statement
                }
                Rewrite::Truncating => {
                    let most_rows = 2 * TRUNCATING_MAX_LIVE as usize;
                    if !crate::pg::refill::refill_message_table(most_rows, TRUNCATING_MAX_BYTES)? {
                        // Its lock lasts to the end of the transaction: nothing more this round.
                        break;
                    }
                    "bussig.message emptied and refilled (a snapshot is held)"
                }
            };
            pgrx::log!(
                "bussig worker: {statement}: {} kB before, {} kB after, in {} ms",
                before / 1024,
                size()? / 1024,
                started.elapsed().as_millis()
            );
            REWRITTEN.with(|rewritten| {
                rewritten
                    .borrow_mut()
                    .insert(relid, (std::time::Instant::now(), bytes))
            });
            compacted += 1;
            // One table per transaction: the rewrite's lock lasts to its end, and the next table's
            // tries, wait and rewrite would hold this one's senders and readers too. The next round
            // (or call) takes the next.
            break;
        }
    }
    Ok(compacted)
}
