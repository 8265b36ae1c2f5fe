//! Dead letters: messages moved to their queue's dead-letter queue by a consumer (dead_letter), by a
//! read or the worker (past their TTL or their last delivery), and moved back (redrive).
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use pgrx::Uuid;

use super::group;
use super::in_flight;
use crate::access::{self, Privilege};
use crate::depth;
use crate::error::{BusError, BusResult};
use crate::pg::wakeup;
use crate::plans::{self, Statement};
use crate::queue;

// Moves messages of queue $5 (of any queue when NULL) to their dead-letter queue: those in $1,
// holding token $2 when one is given, and, unless $6 forces it, only when their last allowed
// delivery has been used.
static DEAD_LETTER: Statement = Statement {
    sql: concat!(
        "UPDATE bussig.message by_id
          SET queue_id = q.dead_letter_queue_id,
              visible_at = clock_timestamp(),
              lock_token = NULL,
              delivery_count = 0,
              final_delivery = false,
              last_error = NULL,
              -- It leaves its group; a dead-letter queue keeps the group's name only of messages that
              -- were in one (see group.rs), for redrive.
              group_id = ",
        counted_group!(),
        ",
              group_seq = NULL,
              group_ready_at = NULL,
              headers = coalesce(by_id.headers, '{}') || jsonb_build_object(
                  'bussig-dead-letter-reason', $3,
                  'bussig-dead-letter-error', coalesce($4, by_id.last_error),
                  'bussig-source-queue', q.name)
          FROM bussig.queue q
          WHERE ($5::text IS NULL OR q.name = $5) AND by_id.queue_id = q.queue_id AND q.dead_letter_queue_id IS NOT NULL
            AND by_id.message_id = ANY ($1)
            AND ($2::uuid IS NULL OR by_id.lock_token = $2)
                        AND ($6 OR by_id.delivery_count >= q.max_deliveries)
          RETURNING by_id.queue_id, (SELECT d.name FROM bussig.queue d WHERE d.queue_id = by_id.queue_id AND d.notify),
                    q.queue_id, by_id.group_id"
    ),
    args: &[
        pg_sys::INT8ARRAYOID,
        pg_sys::UUIDOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::BOOLOID,
    ],
    writes: true,
};

// A dead-letter queue has none of its own: its expired messages are simply dropped (retention).
static DELETE_MESSAGES: Statement = Statement {
    sql: concat!(
        "DELETE FROM bussig.message by_id WHERE message_id = ANY ($1)
          RETURNING queue_id, ",
        counted_group!()
    ),
    args: &[pg_sys::INT8ARRAYOID],
    writes: true,
};

// Messages whose body row is gone get a JSON null for a payload, so that their dead letters can be
// read and peeked.
static WITHOUT_BODY: Statement = Statement {
    sql: "UPDATE bussig.message SET payload = 'null'::jsonb, body_id = NULL WHERE message_id = ANY ($1)",
    args: &[pg_sys::INT8ARRAYOID],
    writes: true,
};

// Messages a consumer of the dead-letter queue holds right now stay where they are.
static REDRIVE: Statement = Statement {
    sql: "WITH picked AS (
              SELECT in_order.ctid AS row_ctid, in_order.visible_at AS dead_at
              FROM bussig.message in_order
              WHERE in_order.queue_id = $2
                AND in_order.headers ->> 'bussig-source-queue' = $1
                AND (in_order.lock_token IS NULL OR in_order.visible_at <= clock_timestamp())
              ORDER BY in_order.priority DESC, in_order.visible_at, in_order.message_id
              LIMIT $4
              FOR UPDATE SKIP LOCKED
          )
          UPDATE bussig.message by_ctid
          SET queue_id = $3,
              visible_at = clock_timestamp(),
              lock_token = NULL,
              delivery_count = 0,
              final_delivery = false,
              last_error = NULL,
              headers = nullif(by_ctid.headers - ARRAY['bussig-dead-letter-reason', 'bussig-dead-letter-error',
                                                       'bussig-source-queue'], '{}')
          FROM picked
          WHERE by_ctid.ctid = picked.row_ctid
          RETURNING by_ctid.message_id, by_ctid.group_id IS NOT NULL,
                    (extract(epoch FROM picked.dead_at) * 1000000)::bigint",
    args: &[pg_sys::TEXTOID, pg_sys::INT4OID, pg_sys::INT4OID, pg_sys::INT4OID],
    writes: true,
};

/// Runs DEAD_LETTER: how many messages moved. Readers waiting on their dead-letter queues are woken,
/// and a dead-letter queue that asked for NOTIFY gets it.
pub(super) fn move_to_dead_letter_queue(
    client: &mut SpiClient<'_>,
    args: &[DatumWithOid<'_>],
) -> BusResult<i64> {
    let mut left = Vec::new();
    let moved = move_leaving_groups(client, args, &mut left)?;
    leave_groups(client, left)?;
    Ok(moved)
}

/// DEAD_LETTER, noting in `left` the groups the moved messages left, for one `leave_groups` later.
fn move_leaving_groups(
    client: &mut SpiClient<'_>,
    args: &[DatumWithOid<'_>],
    left: &mut Vec<(i32, String)>,
) -> BusResult<i64> {
    let mut moved = 0;
    for row in plans::run(client, &DEAD_LETTER, args)? {
        let queue_id: i32 = plans::filled(&row, 1, "dead-letter queue id")?;
        let source_queue_id = plans::filled(&row, 3, "source queue id")?;
        depth::removed(source_queue_id, 1);
        depth::added(queue_id, 1);
        if let Some(group) = row.get::<String>(4)? {
            left.push((source_queue_id, group));
        }
        match row.get::<String>(2)? {
            Some(notify_name) => wakeup::announce(queue_id, &notify_name, true, true, 1),
            None => wakeup::note_ready(queue_id, 1),
        }
        moved += 1;
    }
    Ok(moved)
}

/// Messages of these (queue, group) pairs left their queues: each group's next in line moves up. One
/// call for all of a statement's groups, which it locks in order.
fn leave_groups(client: &mut SpiClient<'_>, mut left: Vec<(i32, String)>) -> BusResult<()> {
    left.sort_unstable();
    for queue in left.chunk_by(|a, b| a.0 == b.0) {
        let groups = queue.iter().map(|(_, group)| group.clone()).collect();
        group::leave(client, queue[0].0, groups)?;
    }
    Ok(())
}

/// Why a message may not be delivered again, found by a read or the worker.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DeadReason {
    /// Older than its queue's message_ttl.
    Expired,
    /// Its last allowed delivery was used.
    MaxDeliveries,
    /// Published with a shared body row that is gone (deleted by hand): it cannot be delivered, and
    /// must not stop its queue's reads at it.
    BodyMissing,
}

impl DeadReason {
    const ALL: [DeadReason; 3] = [
        DeadReason::Expired,
        DeadReason::MaxDeliveries,
        DeadReason::BodyMissing,
    ];

    /// As the `bussig-dead-letter-reason` header and the read statements name it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Expired => "expired",
            DeadReason::MaxDeliveries => "max_deliveries",
            DeadReason::BodyMissing => "body_missing",
        }
    }

    /// The `bussig-dead-letter-error` a dead letter of this reason gets when it has no error of its own.
    fn error(self) -> Option<&'static str> {
        match self {
            DeadReason::BodyMissing => Some("the body row it was published with is gone"),
            DeadReason::Expired | DeadReason::MaxDeliveries => None,
        }
    }

    pub fn parse(reason: &str) -> BusResult<DeadReason> {
        DeadReason::ALL
            .into_iter()
            .find(|known| known.as_str() == reason)
            .ok_or_else(|| BusError::Corrupt(format!("unknown dead-letter reason {reason:?}")))
    }
}

/// A message that may not be delivered again.
pub struct Dead {
    pub message_id: i64,
    pub reason: DeadReason,
    pub has_dead_letter_queue: bool,
}

/// Moves dead messages of `queue` (of any queue when None) to their dead-letter queue, in the
/// caller's transaction; in a queue without one, expired messages and those whose body is gone are
/// deleted (the latter with a WARNING naming them).
pub fn bury(client: &mut SpiClient<'_>, queue: Option<&str>, dead: Vec<Dead>) -> BusResult<()> {
    let mut left = Vec::new();
    for reason in DeadReason::ALL {
        let (moved, dropped): (Vec<&Dead>, Vec<&Dead>) = dead
            .iter()
            .filter(|dead| dead.reason == reason)
            .partition(|dead| dead.has_dead_letter_queue);
        let ids = |list: &[&Dead]| {
            list.iter()
                .map(|dead| dead.message_id)
                .collect::<Vec<i64>>()
        };
        if !moved.is_empty() {
            if reason == DeadReason::BodyMissing {
                plans::run(client, &WITHOUT_BODY, &[ids(&moved).into()])?;
            }
            let args: [DatumWithOid; 6] = [
                ids(&moved).into(),
                Option::<Uuid>::None.into(),
                reason.as_str().into(),
                reason.error().into(),
                queue.into(),
                true.into(),
            ];
            move_leaving_groups(client, &args, &mut left)?;
        }
        if !dropped.is_empty() {
            if reason == DeadReason::BodyMissing {
                pgrx::warning!(
                    "bussig: messages {:?} of queue \"{}\" had lost the body row they were published with and were dropped (the queue has no dead-letter queue)",
                    ids(&dropped),
                    queue.unwrap_or("?")
                );
            }
            for row in plans::run(client, &DELETE_MESSAGES, &[ids(&dropped).into()])? {
                let queue_id = plans::filled(&row, 1, "queue id")?;
                depth::removed(queue_id, 1);
                if let Some(group) = row.get::<String>(2)? {
                    left.push((queue_id, group));
                }
            }
        }
    }
    leave_groups(client, left)
}

/// Moves one delivery of a message of `queue` to its dead-letter queue with `reason` and `error` in
/// its headers: false for a stale token, 55000 when the queue has no dead-letter queue.
pub fn one(
    queue: &str,
    message_id: i64,
    lock_token: Uuid,
    reason: &str,
    error: Option<&str>,
) -> BusResult<bool> {
    access::connect(|client, caller| -> BusResult<bool> {
        caller.require(client, queue, Privilege::Consume)?;
        let args: [DatumWithOid; 6] = [
            vec![message_id].into(),
            lock_token.into(),
            reason.into(),
            error.into(),
            queue.into(),
            true.into(),
        ];
        let found = queue::require(client, queue)?;
        if move_to_dead_letter_queue(client, &args)? > 0 {
            if found.max_in_flight.is_some() {
                in_flight::release_one(client, found.queue_id, message_id, lock_token)?;
            }
            return Ok(true);
        }
        if queue::dead_letter_queue(client, queue, found)?.is_none() {
            return Err(BusError::NoDeadLetterQueue(queue.to_string()));
        }
        Ok(false)
    })
}

/// Moves the messages that came from `queue` back from its dead-letter queue, up to `max_messages`
/// (all when None): how many.
pub fn redrive(queue: &str, max_messages: Option<i32>) -> BusResult<i64> {
    access::connect(|client, caller| -> BusResult<i64> {
        caller.require(client, queue, Privilege::Manage)?;
        let found = queue::require(client, queue)?;
        let Some(dead_letter_queue_id) = queue::dead_letter_queue(client, queue, found)? else {
            return Err(BusError::NoDeadLetterQueue(queue.to_string()));
        };
        let args: [DatumWithOid; 4] = [
            queue.into(),
            dead_letter_queue_id.into(),
            found.queue_id.into(),
            max_messages.into(),
        ];
        let mut redriven = 0;
        let mut grouped = Vec::new();
        for row in plans::run(client, &REDRIVE, &args)? {
            redriven += 1;
            if plans::filled(&row, 2, "grouped")? {
                let dead_at: i64 = plans::filled(&row, 3, "dead-letter time")?;
                grouped.push((dead_at, plans::filled::<i64>(&row, 1, "message id")?));
            }
        }
        depth::removed(dead_letter_queue_id, redriven as usize);
        depth::added(found.queue_id, redriven as usize);
        let ungrouped = redriven - grouped.len() as i64;
        if ungrouped > 0 {
            let count = u32::try_from(ungrouped).unwrap_or(u32::MAX);
            wakeup::announce(found.queue_id, queue, found.notify, true, count);
        }
        // They rejoin their groups behind what is there, in the order they were sent, which is the
        // order they were dead-lettered in: only a group's head can die (its followers are parked
        // where neither reads nor the TTL reach). Message ids do not follow send order. They are
        // announced as they join.
        grouped.sort_unstable();
        group::join(client, grouped.into_iter().map(|(_, id)| id).collect())?;
        Ok(redriven)
    })
}
