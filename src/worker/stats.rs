//! The counts of bussig.queues by state (ready, delayed, locked): the worker's steps that write
//! bussig.queue_stats, each round for the queues commits touched and every bussig.stats_interval for
//! all of them. Also run by `bussig.run_maintenance()`.
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::error::BusResult;
use crate::plans::{self, Statement};

/// Counts by state of the messages `$m` (an alias of bussig.message) at `clock.now`.
macro_rules! counts_by_state {
    ($m:literal) => {
        concat!(
            "count(*) FILTER (WHERE ",
            $m,
            ".visible_at <= clock.now) AS ready,
             count(*) FILTER (WHERE ",
            $m,
            ".visible_at > clock.now AND ",
            $m,
            ".lock_token IS NULL) AS delayed,
             count(*) FILTER (WHERE ",
            $m,
            ".visible_at > clock.now AND ",
            $m,
            ".lock_token IS NOT NULL) AS locked,
             min(",
            $m,
            ".enqueued_at) FILTER (WHERE ",
            $m,
            ".visible_at <= clock.now) AS oldest_ready_since"
        )
    };
}

/// Saves the rows of CTE `counted` (queue_id and `counts_by_state`) to bussig.queue_stats.
macro_rules! save_counts {
    () => {
        "INSERT INTO bussig.queue_stats AS s (queue_id, ready, delayed, locked, oldest_ready_since, counted_at)
         SELECT c.queue_id, c.ready, c.delayed, c.locked, c.oldest_ready_since, clock_timestamp()
         FROM counted c JOIN bussig.queue q USING (queue_id)
         ON CONFLICT (queue_id) DO UPDATE
         SET ready = excluded.ready, delayed = excluded.delayed, locked = excluded.locked,
             oldest_ready_since = excluded.oldest_ready_since, counted_at = excluded.counted_at
         RETURNING queue_id"
    };
}

// One pass over all messages; the worker runs it every bussig.stats_interval.
static REFRESH_STATS: Statement = Statement {
    sql: concat!(
        "WITH clock AS (SELECT clock_timestamp() AS now), counted AS (
             SELECT m.queue_id, ",
        counts_by_state!("m"),
        " FROM bussig.message m, clock GROUP BY m.queue_id
         ), saved AS (",
        save_counts!(),
        ") DELETE FROM bussig.queue_stats s WHERE NOT EXISTS (SELECT FROM saved WHERE saved.queue_id = s.queue_id)"
    ),
    args: &[],
    writes: true,
};

// The queues $1, each counted through its own range of the delivery order.
static COUNT_QUEUES: Statement = Statement {
    sql: concat!(
        "WITH clock AS (SELECT clock_timestamp() AS now), counted AS (
             SELECT ids.queue_id, c.*
             FROM unnest($1::int[]) AS ids(queue_id) CROSS JOIN clock CROSS JOIN LATERAL (
                 SELECT ",
        counts_by_state!("in_order"),
        "        FROM bussig.message in_order WHERE in_order.queue_id = ids.queue_id
             ) c
         ) ",
        save_counts!()
    ),
    args: &[pg_sys::INT4ARRAYOID],
    writes: true,
};

/// Queues of at most this many messages are counted by state every round when a commit changed them;
/// larger ones every bussig.stats_interval.
pub const COUNTED_EVERY_ROUND: i64 = 10_000;

/// A call of advisory-lock function `$f` on the counts' lock. Writers of bussig.queue_stats take it
/// first: two of them upserting the same queues' rows in different orders (one pass counts every
/// queue, another those commits touched, a third deletes the rows of emptied queues) deadlocked, as
/// `run_maintenance` calls beside the worker's rounds did. The worker's steps try it and leave the
/// count to the next round when it is taken; run_maintenance waits for it before its first step,
/// holding nothing yet (see `run_all`).
macro_rules! stats_lock {
    ($f:literal) => {
        concat!(
            "SELECT pg_catalog.",
            $f,
            "(pg_catalog.hashtext('bussig-queue-stats'))"
        )
    };
}

static TRY_STATS_LOCK: Statement = Statement {
    sql: stats_lock!("pg_try_advisory_xact_lock"),
    args: &[],
    writes: true,
};

static STATS_LOCK: Statement = Statement {
    sql: concat!(stats_lock!("pg_advisory_xact_lock"), " IS NULL"),
    args: &[],
    writes: true,
};

/// Waits until this transaction may write bussig.queue_stats: `run_maintenance`'s way.
pub fn wait_for_the_counts(client: &mut SpiClient<'_>) -> BusResult<()> {
    plans::run(client, &STATS_LOCK, &[])?;
    Ok(())
}

/// Whether this transaction holds the right to write bussig.queue_stats (taken now if free).
fn may_write_stats(client: &mut SpiClient<'_>) -> BusResult<bool> {
    Ok(plans::first_value::<bool>(client, &TRY_STATS_LOCK, &[])? == Some(true))
}

/// Counts by state the small queues that commits changed since the last round, so that the split of
/// bussig.queues is about a round old for them. How many it counted (none while another transaction
/// writes the counts: the queues stay touched for the next round).
pub fn count_touched_queues(client: &mut SpiClient<'_>) -> BusResult<i64> {
    if !may_write_stats(client)? {
        return Ok(0);
    }
    let touched = crate::depth::take_touched(COUNTED_EVERY_ROUND);
    if touched.is_empty() {
        return Ok(0);
    }
    Ok(plans::run(client, &COUNT_QUEUES, &[touched.into()])?.len() as i64)
}

/// Recounts every queue for bussig.queues; returns how many queues hold messages (None, counting
/// nothing, while another transaction writes the counts).
pub fn refresh_stats(client: &mut SpiClient<'_>) -> BusResult<Option<i64>> {
    if !may_write_stats(client)? {
        return Ok(None);
    }
    let _scans = crate::pg::planner::whole_table_scans();
    plans::run(client, &REFRESH_STATS, &[])?;
    Ok(Some(
        Spi::get_one::<i64>("SELECT count(*) FROM bussig.queue_stats")?.unwrap_or(0),
    ))
}
