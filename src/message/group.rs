//! Ordered message groups: the messages a queue holds for one `group_id` are delivered one at a time,
//! in send order, while other groups and ungrouped messages flow in parallel. A group's first message
//! (its head) is a message like any other: ready, delayed, locked or waiting for a retry. The others
//! are parked behind it (visible_at 'infinity', past the range any read scans, so a read never walks
//! them) with the time they would have been ready. When the head is acked or dead-lettered, the next
//! in send order takes its place. Send order is the group's own sequence: message ids come from
//! per-backend ranges and do not follow it.
//!
//! `bussig.message_group` counts each group's messages. Sends and settles of one group take its row
//! lock, so they line up: a settle that empties a group and a send that refills it cannot both miss
//! each other.
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use super::nothing_done;
use crate::access::{self, Privilege};
use crate::error::BusResult;
use crate::pg::wakeup;
use crate::pg::xact::sum_per_key;
use crate::plans::{self, Statement};

// New messages (ids in send order) join their groups: each gets its place in its group, and all but
// a group's head are parked with the time they would have been ready. Groups are locked in name order,
// so that two transactions sending to the same groups do not deadlock. The queue's shared groups lock
// keeps a purge from running between a send and its commit (see `purge_lock`).
static JOIN: Statement = Statement {
    sql: "WITH new AS (
              SELECT m.message_id, m.queue_id, m.group_id,
                     row_number() OVER (PARTITION BY m.queue_id, m.group_id ORDER BY ids.ord) AS nth,
                     count(*) OVER (PARTITION BY m.queue_id, m.group_id) AS n
              FROM unnest($1::bigint[]) WITH ORDINALITY AS ids(message_id, ord)
              JOIN bussig.message m ON m.message_id = ids.message_id
              WHERE m.group_id IS NOT NULL
                AND (SELECT true FROM pg_advisory_xact_lock_shared(hashtext('bussig-groups'), m.queue_id))
          ), joined AS (
              INSERT INTO bussig.message_group AS g (queue_id, group_id, pending, last_seq)
              SELECT queue_id, group_id, n, n FROM (SELECT DISTINCT queue_id, group_id, n FROM new) counts
              ORDER BY queue_id, group_id
              ON CONFLICT (queue_id, group_id)
              DO UPDATE SET pending = g.pending + excluded.pending, last_seq = g.last_seq + excluded.last_seq
              RETURNING queue_id, group_id, pending, last_seq
          )
          UPDATE bussig.message m
          SET group_seq = joined.last_seq - new.n + new.nth,
              visible_at = CASE WHEN joined.pending - new.n + new.nth = 1 THEN m.visible_at ELSE 'infinity' END,
              group_ready_at = CASE WHEN joined.pending - new.n + new.nth = 1 THEN NULL ELSE m.visible_at END
          FROM new JOIN joined USING (queue_id, group_id)
          WHERE m.message_id = new.message_id
          RETURNING m.queue_id, m.visible_at < 'infinity', m.visible_at <= clock_timestamp(),
                    (SELECT q.name FROM bussig.queue q WHERE q.queue_id = m.queue_id AND q.notify)",
    args: &[pg_sys::INT8ARRAYOID],
    writes: true,
};

// Messages of groups $2 (sorted, each once; $3 messages of each) left queue $1: the counts go down.
// An upsert, as JOIN's: each row is found by its key through the arbiter index whatever the plan (a
// plan that scanned the queue's groups cost a settle 14 ms at 5,000 groups), rows are locked in the
// order given, as JOIN locks them, so that a settle and a send of the same groups do not deadlock,
// and the row updated is its latest version, also when a send committed after this statement began.
static LEAVE: Statement = Statement {
    sql: "INSERT INTO bussig.message_group AS g (queue_id, group_id, pending, last_seq)
          SELECT $1, gone.group_id, -gone.n, 0 FROM unnest($2::text[], $3::int[]) AS gone(group_id, n)
          ON CONFLICT (queue_id, group_id) DO UPDATE SET pending = g.pending + excluded.pending
          RETURNING g.group_id, g.pending",
    args: &[pg_sys::INT4OID, pg_sys::TEXTARRAYOID, pg_sys::INT4ARRAYOID],
    writes: true,
};

// The next message of each group $2 in queue $1 becomes ready now, or when its own delay ends if that
// is later: as a delayed message does, it takes its place behind what is ready already. Given the
// time it would have been ready, it went to the front of the queue's range, behind the positions
// reads start from, and a grouped consume ran at a third of an ungrouped one. A statement of its own
// after LEAVE: its snapshot sees the messages of sends that LEAVE waited for. Only the head ever
// leaves (the others wait where nothing reaches them), so the first waiting one is next.
static NEXT_IN_LINE: Statement = Statement {
    sql: "UPDATE bussig.message m
          SET visible_at = greatest(m.group_ready_at, clock_timestamp()), group_ready_at = NULL
          FROM unnest($2::text[]) AS groups(group_id)
          WHERE m.message_id = (SELECT p.message_id FROM bussig.message p
                                WHERE p.queue_id = $1 AND p.group_id = groups.group_id
                                  AND p.visible_at = 'infinity'
                                ORDER BY p.group_seq LIMIT 1)
            AND m.visible_at = 'infinity'
          RETURNING m.visible_at <= clock_timestamp(),
                    (SELECT q.name FROM bussig.queue q WHERE q.queue_id = $1),
                    (SELECT q.notify FROM bussig.queue q WHERE q.queue_id = $1)",
    args: &[pg_sys::INT4OID, pg_sys::TEXTARRAYOID],
    writes: true,
};

// Groups left with no message: their rows go (LEAVE holds their locks).
static FORGET: Statement = Statement {
    sql: "DELETE FROM bussig.message_group WHERE queue_id = $1 AND group_id = ANY ($2) AND pending <= 0",
    args: &[pg_sys::INT4OID, pg_sys::TEXTARRAYOID],
    writes: true,
};

// Each group whose head is not ready: locked by a consumer, waiting for a retry after a nack, or
// delayed; since its head was sent. A grouped message that is not ready and not waiting behind its
// head is its group's head, so the queue's not-ready range holds them all.
static BLOCKED: Statement = Statement {
    sql: concat!(
        "WITH RECURSIVE q AS (SELECT queue_id FROM bussig.queue WHERE name = $1), ",
        queue_priorities!("(SELECT queue_id FROM q)"),
        "
         SELECT head.group_id, head.message_id,
                CASE WHEN head.lock_token IS NOT NULL THEN 'locked'
                     WHEN head.delivery_count > 0 THEN 'retry'
                     ELSE 'delayed' END,
                head.enqueued_at
         FROM priorities CROSS JOIN LATERAL (
             SELECT in_order.* FROM bussig.message in_order
             WHERE in_order.queue_id = (SELECT queue_id FROM q) AND in_order.priority = priorities.priority
               AND in_order.visible_at > clock_timestamp() AND in_order.visible_at < 'infinity'
         ) head
         WHERE head.group_seq IS NOT NULL
         ORDER BY head.enqueued_at, head.group_id"
    ),
    args: &[pg_sys::TEXTOID],
    writes: false,
};

// A purge's hold on queue $1's groups: it waits for grouped sends in flight, and later ones wait for it,
// so that it neither leaves a message waiting in a group it deleted nor deletes the group of one it
// did not see.
static PURGE_LOCK: Statement = Statement {
    sql: "SELECT pg_advisory_xact_lock(hashtext('bussig-groups'), $1)",
    args: &[pg_sys::INT4OID],
    writes: false,
};

/// Takes queue `queue_id`'s groups for a purge, before it reads what to delete.
pub fn purge_lock(client: &mut SpiClient<'_>, queue_id: i32) -> BusResult<()> {
    plans::run(client, &PURGE_LOCK, &[queue_id.into()])?;
    Ok(())
}

/// New messages, in send order, join their groups; ids of ungrouped messages are passed over. Those
/// that head their group are announced as a send announces its messages; the others are not ready,
/// and wake nobody until their turn comes (`leave`). How many joined a group.
pub fn join(client: &mut SpiClient<'_>, message_ids: Vec<i64>) -> BusResult<usize> {
    if message_ids.is_empty() {
        return Ok(0);
    }
    let mut joined = 0;
    for row in plans::run(client, &JOIN, &[message_ids.into()])? {
        joined += 1;
        if !plans::filled::<bool>(&row, 2, "head")? {
            continue;
        }
        let queue_id = plans::filled(&row, 1, "queue id")?;
        match row.get::<String>(4)? {
            Some(name) => {
                let ready_now = plans::filled(&row, 3, "ready")?;
                wakeup::announce(queue_id, &name, true, ready_now, 1);
            }
            None => wakeup::note_ready(queue_id, 1),
        }
    }
    Ok(joined)
}

/// Messages of `groups` (one entry per message) left queue `queue_id` by an ack or a move to the
/// dead-letter queue: the next of each group becomes ready, and readers waiting for it are woken.
pub fn leave(client: &mut SpiClient<'_>, queue_id: i32, groups: Vec<String>) -> BusResult<()> {
    if groups.is_empty() {
        return Ok(());
    }
    let (names, counts): (Vec<String>, Vec<i32>) = sum_per_key(
        groups.into_iter().map(|group| (group, 1)).collect(),
        |n, one| *n += one,
    )
    .into_iter()
    .unzip();
    let (mut next, mut empty) = (Vec::new(), Vec::new());
    for row in plans::run(
        client,
        &LEAVE,
        &[queue_id.into(), names.into(), counts.into()],
    )? {
        let group: String = plans::filled(&row, 1, "group id")?;
        let pending: i32 = plans::filled(&row, 2, "group's messages")?;
        if pending > 0 {
            next.push(group);
        } else {
            empty.push(group);
        }
    }
    if !next.is_empty() {
        crate::depth::touched(queue_id);
        // As a send announces its messages: waiting readers are woken (for a message still delayed,
        // to sleep until it is ready), and a queue that asked for NOTIFY gets it.
        for row in plans::run(client, &NEXT_IN_LINE, &[queue_id.into(), next.into()])? {
            let ready_now: bool = plans::filled(&row, 1, "ready")?;
            let name: Option<String> = row.get(2)?;
            let notify = row.get::<bool>(3)?.unwrap_or(false);
            match name {
                Some(name) => wakeup::announce(queue_id, &name, notify, ready_now, 1),
                None => wakeup::note_ready(queue_id, 1),
            }
        }
    }
    if !empty.is_empty() {
        plans::run(client, &FORGET, &[queue_id.into(), empty.into()])?;
    }
    Ok(())
}

/// A group whose head is not ready, as `bussig.blocked_groups` shows it.
pub type BlockedRow = (String, i64, String, TimestampWithTimeZone);

/// The groups of `queue` whose head is not ready; 42704 for an unknown queue.
pub fn blocked_in(queue: &str) -> BusResult<Vec<BlockedRow>> {
    access::connect(|client, caller| {
        caller.require(client, queue, Privilege::Consume)?;
        let rows = blocked(client, queue)?;
        if rows.is_empty() {
            return nothing_done(client, queue, rows);
        }
        Ok(rows)
    })
}

fn blocked(client: &mut SpiClient<'_>, queue: &str) -> BusResult<Vec<BlockedRow>> {
    plans::run(client, &BLOCKED, &[queue.into()])?
        .map(|row| {
            Ok((
                plans::filled(&row, 1, "group id")?,
                plans::filled(&row, 2, "message id")?,
                plans::filled(&row, 3, "state")?,
                plans::filled(&row, 4, "enqueue time")?,
            ))
        })
        .collect()
}

/// The group ids a settle statement returned in `column` (NULL for ungrouped messages).
pub fn returned_groups(
    rows: pgrx::spi::SpiTupleTable<'_>,
    column: usize,
) -> BusResult<(i64, Vec<String>)> {
    let mut count = 0;
    let mut groups = Vec::new();
    for row in rows {
        count += 1;
        if let Some(group) = row.get::<String>(column)? {
            groups.push(group);
        }
    }
    Ok((count, groups))
}
