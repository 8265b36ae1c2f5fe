//! The worker's steps. Each runs in the caller's transaction and is also reachable from SQL through
//! `bussig.run_maintenance()`, so it can be tested, and scheduled where the worker is not loaded.
use std::time::Instant;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::error::BusResult;
use crate::message::dead_letter::{bury, Dead, DeadReason};
use crate::pg::gucs;
use crate::pg::wakeup;
use crate::plans::{self, Statement};
use crate::queue;

use super::stats;

/// Rows one step handles per transaction, so that no step holds locks for long.
pub const BATCH: i32 = 1000;

/// A condition on message `$m`: it is in no group, or its group's row is free, and now locked for
/// this step's move of it. A group that an open send or settle holds waits for the next round,
/// instead of the step waiting on it (and every other queue with it).
macro_rules! group_free {
    ($m:literal) => {
        concat!(
            "(",
            $m,
            ".group_seq IS NULL OR EXISTS (
                 SELECT FROM bussig.message_group g WHERE g.queue_id = ",
            $m,
            ".queue_id AND g.group_id = ",
            $m,
            ".group_id
                 FOR UPDATE SKIP LOCKED))"
        )
    };
}

static EXPIRED_FINAL_LOCKS: Statement = Statement {
    sql: concat!(
        "SELECT by_lock.message_id FROM bussig.message by_lock JOIN bussig.queue q USING (queue_id)
          WHERE by_lock.final_delivery AND by_lock.lock_token IS NOT NULL
            AND by_lock.visible_at <= (SELECT clock_timestamp()) AND by_lock.delivery_count >= q.max_deliveries
            AND ",
        group_free!("by_lock"),
        "
          ORDER BY by_lock.visible_at LIMIT $1
          FOR UPDATE OF by_lock SKIP LOCKED"
    ),
    args: &[pg_sys::INT4OID],
    writes: true,
};

// Messages ready for longer than their queue's TTL, each priority's oldest first: found at the front of
// its range, however long the queue. A message that became ready later (delayed or redelivered) and
// is past its TTL too is dead-lettered when a read reaches it, or here once it has been ready that long.
static EXPIRED_BY_TTL: Statement = Statement {
    sql: concat!(
        "SELECT expired.message_id, q.dead_letter_queue_id IS NOT NULL
         FROM bussig.queue q
         CROSS JOIN LATERAL (
             WITH RECURSIVE ",
        queue_priorities!("q.queue_id"),
        "
             SELECT in_order.message_id
             FROM priorities CROSS JOIN LATERAL (
                 SELECT in_order.message_id FROM bussig.message in_order
                 WHERE in_order.queue_id = q.queue_id AND in_order.priority = priorities.priority
                   AND in_order.visible_at <= (SELECT clock_timestamp()) - q.message_ttl
                   AND ",
        group_free!("in_order"),
        "
                 ORDER BY in_order.visible_at, in_order.message_id
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED
             ) in_order
             LIMIT $1
         ) expired
         WHERE q.message_ttl IS NOT NULL"
    ),
    args: &[pg_sys::INT4OID],
    writes: true,
};

static PRUNE_DEDUP_KEYS: Statement = Statement {
    sql: "DELETE FROM bussig.dedup WHERE ctid = ANY (ARRAY(
              SELECT ctid FROM bussig.dedup WHERE expires_at <= now() LIMIT $1))",
    args: &[pg_sys::INT4OID],
    writes: true,
};

static EXPIRED_EPHEMERAL_QUEUES: Statement = Statement {
    sql: "SELECT queue_id FROM bussig.queue
          WHERE ephemeral_ttl IS NOT NULL AND heartbeat_at + ephemeral_ttl < clock_timestamp()
          FOR UPDATE SKIP LOCKED",
    args: &[],
    writes: true,
};

static NEXT_FANOUT: Statement = Statement {
    sql: "SELECT fanout_id, next_index, cardinality(queue_ids), visible_at <= clock_timestamp(), visible_at
          FROM bussig.fanout ORDER BY fanout_id LIMIT 1
          FOR UPDATE SKIP LOCKED",
    args: &[],
    writes: true,
};

// Queues dropped since the publish are skipped.
static FANOUT_CHUNK: Statement = Statement {
    sql:
        "INSERT INTO bussig.message (queue_id, body_id, headers, visible_at, enqueued_at, priority,
                                      correlation_id, reply_to, subject)
          SELECT q.queue_id, f.body_id, f.headers, f.visible_at, f.enqueued_at, f.priority,
                 f.correlation_id, f.reply_to, f.subject
          FROM bussig.fanout f
          CROSS JOIN LATERAL unnest(f.queue_ids[$2:$3]) AS target(queue_id)
          JOIN bussig.queue q ON q.queue_id = target.queue_id
          WHERE f.fanout_id = $1
          RETURNING queue_id",
    args: &[pg_sys::INT8OID, pg_sys::INT4OID, pg_sys::INT4OID],
    writes: true,
};

static ANNOUNCED_QUEUES: Statement = Statement {
    sql: "SELECT queue_id, name, notify FROM bussig.queue WHERE queue_id = ANY ($1)",
    args: &[pg_sys::INT4ARRAYOID],
    writes: false,
};

// Writing statements, for a new snapshot: a queue's notify flag may have just been set.
static NOTIFY_QUEUES: Statement = Statement {
    sql: "SELECT pg_notify('bussig_' || name, '') FROM bussig.queue WHERE notify AND queue_id = ANY ($1)",
    args: &[pg_sys::INT4ARRAYOID],
    writes: true,
};

static NOTIFY_ALL: Statement = Statement {
    sql: "SELECT pg_notify('bussig_' || name, '') FROM bussig.queue WHERE notify",
    args: &[],
    writes: true,
};

static FANOUT_ADVANCE: Statement = Statement {
    sql: "UPDATE bussig.fanout SET next_index = $2 WHERE fanout_id = $1",
    args: &[pg_sys::INT8OID, pg_sys::INT4OID],
    writes: true,
};

// Whether a queue of fan-out $1's chunk $2..$3 is missing though no drop recorded it, in the hour
// after the extension was made: a restore that has loaded the fan-out but not yet bussig.queue (see
// design.md, "Nothing the worker deletes is judged by absence alone"). The chunk waits: skipped, its
// queues would never get the message.
static RESTORING_QUEUES: Statement = Statement {
    sql: concat!("SELECT ", made_within_the_hour!(), "
             AND EXISTS (SELECT FROM bussig.fanout f CROSS JOIN LATERAL unnest(f.queue_ids[$2:$3]) AS t(queue_id)
                         WHERE f.fanout_id = $1
                           AND NOT EXISTS (SELECT FROM bussig.queue q WHERE q.queue_id = t.queue_id)
                           AND NOT EXISTS (SELECT FROM bussig.dropped_queue d WHERE d.queue_id = t.queue_id))"),
    args: &[pg_sys::INT8OID, pg_sys::INT4OID, pg_sys::INT4OID],
    writes: true,
};

static FANOUT_DONE: Statement = Statement {
    sql: "DELETE FROM bussig.fanout WHERE fanout_id = $1",
    args: &[pg_sys::INT8OID],
    writes: true,
};

// Examines the next $2 bodies after body_id $1: deletes those nothing has referred to for a minute,
// marks those nothing refers to now, and clears the mark of those referred to again. Returns the last
// body examined (NULL at the end of the table) and how many went. Deletes none in the hour after the
// extension was made (CREATE EXTENSION, or its update: when the stream body ring was made): a restore
// loads the bodies, and a minute or more later the messages that refer to them.
static COLLECT_BODIES: Statement = Statement {
    sql: concat!("WITH examined AS (
              SELECT b.body_id, b.unreferenced_since,
                     NOT EXISTS (SELECT FROM bussig.message by_body WHERE by_body.body_id = b.body_id)
                     AND NOT EXISTS (SELECT FROM bussig.fanout f WHERE f.body_id = b.body_id) AS unreferenced
              FROM bussig.body b WHERE b.body_id > $1 ORDER BY b.body_id LIMIT $2
          ), collected AS (
              DELETE FROM bussig.body b USING examined e
              WHERE b.body_id = e.body_id AND e.unreferenced
                AND e.unreferenced_since < clock_timestamp() - interval '1 minute'
                AND NOT ", made_within_the_hour!(), "
              RETURNING 1
          ), marked AS (
              UPDATE bussig.body b
              SET unreferenced_since = CASE WHEN e.unreferenced THEN clock_timestamp() END
              FROM examined e
              WHERE b.body_id = e.body_id AND e.unreferenced = (e.unreferenced_since IS NULL)
          )
          SELECT (SELECT max(body_id) FROM examined), (SELECT count(*) FROM collected)"),
    args: &[pg_sys::INT8OID, pg_sys::INT4OID],
    writes: true,
};

// A send racing drop_queue can leave a message (and its group) whose queue is gone; nobody could ever
// read it. Such a send began before the drop committed, so before the worker noticed the drop (a round
// after, once the dropping transaction has ended altogether, its invalidations sent). Once no
// transaction of this database that began before the notice is left, every racing send has committed
// or rolled back: the drop is settled. Sessions whose activity is not tracked, and a prepared
// transaction (its start is not shown), hold it back, as does a session this role cannot see (then
// nothing is settled). A notice of this transaction's own, or of one that committed after it began,
// waits. The sessions are those of the status snapshot STATUS_NOW took, before the prepared
// transactions are read: a sender that prepares in between is in one or the other.
static SETTLED_DROPS: Statement = Statement {
    sql: "DELETE FROM bussig.dropped_queue d
          WHERE d.noticed_at < pg_catalog.transaction_timestamp()
            AND pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE')
            AND NOT EXISTS (SELECT FROM bussig.queue q WHERE q.queue_id = d.queue_id)
            AND NOT EXISTS (SELECT FROM pg_catalog.pg_stat_activity a
                            WHERE a.datname = current_database() AND a.pid <> pg_catalog.pg_backend_pid()
                              AND (a.xact_start <= d.noticed_at OR a.state = 'disabled'))
            AND NOT EXISTS (SELECT FROM pg_catalog.pg_prepared_xacts p WHERE p.database = current_database())
          RETURNING d.queue_id",
    args: &[],
    writes: true,
};

// The sessions as they are now, when a noticed drop waits to be settled (the first statement returns
// a row only then: most rounds read no session): the backend status is read once a transaction and
// kept to its end.
static STATUS_NOW: [Statement; 2] = [
    Statement {
        sql: "SELECT pg_catalog.pg_stat_clear_snapshot()
              FROM bussig.dropped_queue WHERE noticed_at IS NOT NULL LIMIT 1",
        args: &[],
        writes: true,
    },
    Statement {
        sql: "SELECT count(*) FROM pg_catalog.pg_stat_activity",
        args: &[],
        writes: true,
    },
];

// The messages and groups of settled drops. A statement after SETTLED_DROPS: its snapshot sees what
// every racing send committed.
static ORPHANED_MESSAGES: Statement = Statement {
    sql: "WITH orphaned_groups AS (
              DELETE FROM bussig.message_group WHERE queue_id = ANY ($1)
          )
          DELETE FROM bussig.message in_order WHERE queue_id = ANY ($1)",
    args: &[pg_sys::INT4ARRAYOID],
    writes: true,
};

// Drops committed since the last round whose transaction has ended (no lock on its id is left); after
// SETTLED_DROPS, so that none is settled in the round that notices it.
static NOTICE_DROPS: Statement = Statement {
    sql: "UPDATE bussig.dropped_queue d SET noticed_at = clock_timestamp()
          WHERE d.noticed_at IS NULL
            AND NOT EXISTS (SELECT FROM pg_catalog.pg_locks l
                            WHERE l.locktype = 'transactionid' AND l.transactionid = d.xmin)",
    args: &[],
    writes: true,
};

/// Dead-letters messages whose lock ran out on their last allowed delivery.
pub fn dead_letter_expired_locks(client: &mut SpiClient<'_>) -> BusResult<i64> {
    let dead: Vec<Dead> =
        plans::first_column::<i64>(client, &EXPIRED_FINAL_LOCKS, &[BATCH.into()])?
            .into_iter()
            .map(|message_id| Dead {
                message_id,
                reason: DeadReason::MaxDeliveries,
                has_dead_letter_queue: true,
            })
            .collect();
    let count = dead.len() as i64;
    bury(client, None, dead)?;
    Ok(count)
}

/// Dead-letters messages older than their queue's message_ttl (deletes them in a dead-letter queue).
pub fn expire_messages(client: &mut SpiClient<'_>) -> BusResult<i64> {
    let mut dead: Vec<Dead> = Vec::new();
    for row in plans::run(client, &EXPIRED_BY_TTL, &[BATCH.into()])? {
        dead.push(Dead {
            message_id: plans::filled(&row, 1, "message id")?,
            reason: DeadReason::Expired,
            has_dead_letter_queue: plans::filled(&row, 2, "dead-letter flag")?,
        });
    }
    let count = dead.len() as i64;
    bury(client, None, dead)?;
    Ok(count)
}

pub fn prune_dedup_keys(client: &mut SpiClient<'_>) -> BusResult<i64> {
    Ok(plans::run(client, &PRUNE_DEDUP_KEYS, &[BATCH.into()])?.len() as i64)
}

/// Drops ephemeral queues whose heartbeat stopped, with their messages and subscriptions.
pub fn drop_expired_queues(client: &mut SpiClient<'_>) -> BusResult<i64> {
    let expired: Vec<i32> = plans::first_column(client, &EXPIRED_EPHEMERAL_QUEUES, &[])?;
    let mut dropped = 0;
    for queue_id in expired {
        // A queue whose message an open transaction holds (a consumer idle in it) waits for a later
        // round; the others go now. Its lock wait failed the whole step, every round, before.
        let gone = crate::pg::xact::waiting_at_most(client, EXPIRED_QUEUE_WAIT, |client| {
            queue::drop_by_id(client, queue_id)
        })?;
        if gone == Some(true) {
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// How long the drop of one expired ephemeral queue waits for the locks of its rows.
const EXPIRED_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Delivers up to `chunk` queues of the oldest pending fan-out; None when there is none, or when it
/// waits for a restore (`RESTORING_QUEUES`).
pub fn fan_out_chunk(client: &mut SpiClient<'_>, chunk: i32) -> BusResult<Option<i64>> {
    let Some(job) = plans::run(client, &NEXT_FANOUT, &[])?.next() else {
        return Ok(None);
    };
    let fanout_id: i64 = plans::filled(&job, 1, "fan-out id")?;
    let from: i32 = plans::filled(&job, 2, "first queue")?;
    let total: i32 = plans::filled(&job, 3, "queue count")?;
    let ready_now: bool = plans::filled(&job, 4, "ready now")?;
    // The messages keep the publish's ready time, before this transaction began.
    let ready_at: TimestampWithTimeZone = plans::filled(&job, 5, "ready time")?;
    let to = from.saturating_add(chunk - 1).min(total);
    let range = [fanout_id.into(), from.into(), to.into()];
    if plans::first_value::<bool>(client, &RESTORING_QUEUES, &range)? == Some(true) {
        return Ok(None);
    }
    wakeup::note_ready_from(ready_at.into_inner());
    let delivered: Vec<i32> = plans::first_column(client, &FANOUT_CHUNK, &range)?;
    if to >= total {
        plans::run(client, &FANOUT_DONE, &[fanout_id.into()])?;
    } else {
        plans::run(
            client,
            &FANOUT_ADVANCE,
            &[fanout_id.into(), (to + 1).into()],
        )?;
    }
    for &queue_id in &delivered {
        crate::depth::added(queue_id, 1);
    }
    if !delivered.is_empty() {
        for row in plans::run(client, &ANNOUNCED_QUEUES, &[delivered.clone().into()])? {
            let queue_id: i32 = plans::filled(&row, 1, "queue id")?;
            let name: String = plans::filled(&row, 2, "queue name")?;
            wakeup::announce(
                queue_id,
                &name,
                plans::filled(&row, 3, "notify")?,
                ready_now,
                1,
            );
        }
    }
    Ok(Some(delivered.len() as i64))
}

/// Deletes unreferenced bodies among the next BATCH after `after`, so that no round walks every live
/// body. Returns how many went, and where the next round goes on (None: the end was reached).
pub fn collect_bodies(client: &mut SpiClient<'_>, after: i64) -> BusResult<(i64, Option<i64>)> {
    let row = plans::run(client, &COLLECT_BODIES, &[after.into(), BATCH.into()])?
        .next()
        .expect("an aggregate returns a row");
    Ok((row.get::<i64>(2)?.unwrap_or(0), row.get::<i64>(1)?))
}

/// One whole pass over the bodies.
fn collect_all_bodies(client: &mut SpiClient<'_>) -> BusResult<i64> {
    let (mut after, mut collected) = (0, 0);
    loop {
        let (count, next) = collect_bodies(client, after)?;
        collected += count;
        match next {
            Some(next) => after = next,
            None => return Ok(collected),
        }
    }
}

/// Sends the NOTIFY of the queues among `queue_ids` (of every queue, with `all`) that asked for one:
/// how many. They go out when the worker's transaction commits. Called in a transaction of its own.
pub fn notify(client: &mut SpiClient<'_>, queue_ids: &[i32], all: bool) -> BusResult<i64> {
    // A notification needs no durable commit; waiting for a WAL flush per batch of them would keep
    // the worker busy exactly when senders commit fastest.
    gucs::set(
        c"synchronous_commit",
        c"off",
        pg_sys::GucAction::GUC_ACTION_LOCAL,
    );
    // Its custom plans look cheaper than the generic one, so the plan cache would plan the statement
    // anew on every call: that was a third of the worker's time under a stream of notifying commits.
    gucs::set(
        c"plan_cache_mode",
        c"force_generic_plan",
        pg_sys::GucAction::GUC_ACTION_LOCAL,
    );
    let sent = if all {
        plans::run(client, &NOTIFY_ALL, &[])?
    } else {
        plans::run(client, &NOTIFY_QUEUES, &[queue_ids.to_vec().into()])?
    };
    Ok(sent.len() as i64)
}

/// Deletes the messages sends left for queues whose drop is settled (see SETTLED_DROPS): how many.
/// Nothing under a transaction-long snapshot, which would not see what racing sends committed.
pub fn remove_orphans(client: &mut SpiClient<'_>) -> BusResult<i64> {
    if crate::pg::xact::snapshot_is_fixed() {
        return Ok(0);
    }
    let [clear_status, read_status] = &STATUS_NOW;
    let mut removed = 0;
    if !plans::run(client, clear_status, &[])?.is_empty() {
        plans::run(client, read_status, &[])?;
        let settled = plans::first_column::<i32>(client, &SETTLED_DROPS, &[])?;
        if !settled.is_empty() {
            removed = plans::run(client, &ORPHANED_MESSAGES, &[settled.into()])?.len() as i64;
        }
    }
    plans::run(client, &NOTICE_DROPS, &[])?;
    Ok(removed)
}

/// Every step once, in the caller's transaction; pending fan-outs are delivered completely. What each
/// step did, and how long it all took.
pub fn run_all(client: &mut SpiClient<'_>) -> BusResult<serde_json::Value> {
    let started = Instant::now();
    // First: it counts only in a transaction that has no transaction id yet (the caller's may).
    let recounted = crate::depth::recount(client)?;
    // Before any other step, so that the wait holds nothing another writer of the counts could wait for.
    stats::wait_for_the_counts(client)?;
    let mut fanned_out = 0;
    while let Some(delivered) = fan_out_chunk(client, BATCH)? {
        fanned_out += delivered;
    }
    Ok(serde_json::json!({
        "dead_lettered_locks": dead_letter_expired_locks(client)?,
        "expired_messages": expire_messages(client)?,
        "pruned_dedup_keys": prune_dedup_keys(client)?,
        "dropped_queues": drop_expired_queues(client)?,
        "fanned_out": fanned_out,
        "collected_bodies": collect_all_bodies(client)?,
        "removed_orphans": remove_orphans(client)?,
        "counted_touched_queues": stats::count_touched_queues(client)?,
        // Counted: the wait above took the right to write the counts.
        "counted_queues": stats::refresh_stats(client)?.unwrap_or(0),
        "recounted_depths": recounted,
        "emptied_stream_segments": crate::stream::retention::rotate_all(client)?,
        "emptied_body_segments": crate::stream::body::collect(client)?,
        "adopted_stream_tables": crate::stream::definition::adopt_restored(client)?,
        // Last: the lock a rewrite takes is held to the end of the caller's transaction.
        "compacted_tables": super::compaction::compact(client)?,
        "milliseconds": started.elapsed().as_millis() as u64,
    }))
}
