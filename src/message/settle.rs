//! Settling a delivery: ack, ack_batch, nack and extend_lock, each matched by its lock token.
use pgrx::datum::{DatumWithOid, Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use pgrx::Uuid;

use super::dead_letter::{move_to_dead_letter_queue, DeadReason};
use super::group;
use super::in_flight;
use super::nothing_done;
use crate::access::{self, Privilege};
use crate::depth;
use crate::error::{BusError, BusResult};
use crate::pg::datum::{ArrayShape, BigintArray, UuidArray};
use crate::pg::wakeup;
use crate::plans::{self, Statement};
use crate::queue;

// Acks take the queue as its id, from queue::destination.
static ACK: Statement = Statement {
    sql: concat!(
        "DELETE FROM bussig.message by_id
          WHERE queue_id = $1 AND message_id = $2 AND lock_token = $3 ",
        "RETURNING ",
        counted_group!()
    ),
    args: &[pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::UUIDOID],
    writes: true,
};

// A listed message goes when its current token is among the listed ones. Tokens are random and each
// belongs to one delivery of one message, so that is the same as matching each id with its own token,
// and it needs no join with the unnested lists (a fifth of an ack's executor time).
static ACK_BATCH: Statement = Statement {
    sql: concat!(
        "DELETE FROM bussig.message by_id
          WHERE by_id.message_id = ANY ($2) AND by_id.queue_id = $1 AND by_id.lock_token = ANY ($3) ",
        "RETURNING ", counted_group!()
    ),
    args: &[pg_sys::INT4OID, pg_sys::INT8ARRAYOID, pg_sys::UUIDARRAYOID],
    writes: true,
};

// A message on its last allowed delivery is not given back: NACK leaves it for DEAD_LETTER.
static NACK: Statement = Statement {
    sql: "UPDATE bussig.message by_id
          SET visible_at = clock_timestamp() + coalesce($4, bussig.retry_backoff(q.retry_delay, q.retry_multiplier,
                                                                     q.retry_delay_max, by_id.delivery_count)),
              lock_token = NULL,
              last_error = coalesce($5, by_id.last_error)
          FROM bussig.queue q
          WHERE q.name = $1 AND by_id.queue_id = q.queue_id AND by_id.message_id = $2 AND by_id.lock_token = $3
            AND NOT (q.dead_letter_queue_id IS NOT NULL AND by_id.delivery_count >= q.max_deliveries)
          RETURNING q.queue_id, q.notify, by_id.visible_at <= clock_timestamp()",
    args: &[pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::UUIDOID, pg_sys::INTERVALOID, pg_sys::TEXTOID],
    writes: true,
};

// Returns whether the lock now ends sooner than it did: the subquery reads the statement's snapshot,
// which holds the row as it was.
static EXTEND_LOCK: Statement = Statement {
    sql:
        "UPDATE bussig.message by_id
          SET visible_at = clock_timestamp() + coalesce($4, q.lock_timeout)
          FROM bussig.queue q
          WHERE q.name = $1 AND by_id.queue_id = q.queue_id AND by_id.message_id = $2 AND by_id.lock_token = $3
          RETURNING q.queue_id,
                    by_id.visible_at < (SELECT was.visible_at FROM bussig.message was
                                        WHERE was.message_id = by_id.message_id)",
    args: &[
        pg_sys::TEXTOID,
        pg_sys::INT8OID,
        pg_sys::UUIDOID,
        pg_sys::INTERVALOID,
    ],
    writes: true,
};

// A capped queue's delivery, locked while its slot is checked (message first, then slot, as every
// settle takes them): the time its lock is to end.
static LOCK_DELIVERY: Statement = Statement {
    sql: "SELECT clock_timestamp() + coalesce($4, q.lock_timeout), by_id.visible_at
          FROM bussig.message by_id JOIN bussig.queue q USING (queue_id)
          WHERE q.queue_id = $1 AND by_id.message_id = $2 AND by_id.lock_token = $3
          FOR NO KEY UPDATE OF by_id",
    args: &[
        pg_sys::INT4OID,
        pg_sys::INT8OID,
        pg_sys::UUIDOID,
        pg_sys::INTERVALOID,
    ],
    writes: true,
};

static EXTEND_LOCKED: Statement = Statement {
    sql: "UPDATE bussig.message SET visible_at = $3 WHERE message_id = $1 AND lock_token = $2",
    args: &[pg_sys::INT8OID, pg_sys::UUIDOID, pg_sys::TIMESTAMPTZOID],
    writes: true,
};

/// extend_lock in a capped queue: only while the delivery still holds its slot (a reader that found
/// its lock run out may have taken it), and its slot with it, to the same time.
fn extend_capped(
    client: &mut SpiClient<'_>,
    queue_id: i32,
    message_id: i64,
    lock_token: Uuid,
    lock_timeout: Option<Interval>,
) -> BusResult<bool> {
    let args = [
        queue_id.into(),
        message_id.into(),
        lock_token.into(),
        lock_timeout.into(),
    ];
    let Some(row) = plans::run(client, &LOCK_DELIVERY, &args)?.next() else {
        return Ok(false);
    };
    let until: TimestampWithTimeZone = plans::filled(&row, 1, "lock end")?;
    let was: TimestampWithTimeZone = plans::filled(&row, 2, "lock end before")?;
    if !in_flight::extend(client, queue_id, message_id, lock_token, until)? {
        return Ok(false);
    }
    let args = [message_id.into(), lock_token.into(), until.into()];
    plans::run(client, &EXTEND_LOCKED, &args)?;
    if until < was {
        wake_for_sooner_end(queue_id);
    }
    Ok(true)
}

/// A lock made to end sooner: a reader waiting on the queue may have planned to sleep past the new
/// end (until the next message it saw would be ready). One is woken at commit, and sleeps again only
/// until then.
fn wake_for_sooner_end(queue_id: i32) {
    wakeup::note_readable(queue_id, 1);
}

/// Deletes the acknowledged messages of `queue` whose lock tokens still hold: how many.
pub fn acknowledge(
    client: &mut SpiClient<'_>,
    queue: &str,
    (message_ids, lock_tokens): (BigintArray, UuidArray),
) -> BusResult<i64> {
    let found = queue::require(client, queue)?;
    let args = [
        found.queue_id.into(),
        message_ids.into(),
        lock_tokens.into(),
    ];
    let acked = settle_deleted(client, found.queue_id, &ACK_BATCH, &args)?;
    if found.max_in_flight.is_some() {
        in_flight::release(
            client,
            found.queue_id,
            message_ids.into(),
            lock_tokens.into(),
        )?;
    }
    Ok(acked)
}

/// Runs an ack statement of queue `queue_id`: how many messages it deleted. Their groups move on.
fn settle_deleted(
    client: &mut SpiClient<'_>,
    queue_id: i32,
    statement: &'static Statement,
    args: &[DatumWithOid<'_>],
) -> BusResult<i64> {
    let (acked, groups) = group::returned_groups(plans::run(client, statement, args)?, 1)?;
    depth::removed(queue_id, acked as usize);
    group::leave(client, queue_id, groups)?;
    Ok(acked)
}

/// Message ids and their lock tokens, checked to pair up one to one.
pub fn settled_pairs(
    message_ids: BigintArray,
    lock_tokens: UuidArray,
) -> BusResult<(BigintArray, UuidArray)> {
    let (ids, null_id) = message_ids.shape();
    let (tokens, null_token) = lock_tokens.shape();
    if null_id {
        return Err(BusError::NullArgument("every element of message_ids"));
    }
    if null_token {
        return Err(BusError::NullArgument("every element of lock_tokens"));
    }
    if ids != tokens {
        return Err(BusError::invalid(
            "lock_tokens",
            format!("{tokens} lock tokens do not match {ids} message ids"),
        ));
    }
    Ok((message_ids, lock_tokens))
}

/// Acknowledges one delivery: false for a stale token.
pub fn ack(queue: &str, message_id: i64, lock_token: Uuid) -> BusResult<bool> {
    access::connect(|client, caller| {
        caller.require(client, queue, Privilege::Consume)?;
        let found = queue::require(client, queue)?;
        let args = [found.queue_id.into(), message_id.into(), lock_token.into()];
        let acked = settle_deleted(client, found.queue_id, &ACK, &args)? > 0;
        if found.max_in_flight.is_some() {
            in_flight::release_one(client, found.queue_id, message_id, lock_token)?;
        }
        Ok(acked)
    })
}

/// Acknowledges the deliveries of `pairs` whose tokens still hold: how many.
pub fn ack_batch(queue: &str, pairs: (BigintArray, UuidArray)) -> BusResult<i64> {
    access::connect(|client, caller| {
        caller.require(client, queue, Privilege::Consume)?;
        acknowledge(client, queue, pairs)
    })
}

/// Gives one delivery back, ready after `delay` (the queue's backoff when None), keeping `error` for
/// the dead-letter headers. On the last allowed delivery the message is dead-lettered instead.
pub fn nack(
    queue: &str,
    message_id: i64,
    lock_token: Uuid,
    delay: Option<Interval>,
    error: Option<&str>,
) -> BusResult<bool> {
    access::connect(|client, caller| -> BusResult<bool> {
        caller.require(client, queue, Privilege::Consume)?;
        let found = queue::require(client, queue)?;
        let args: [DatumWithOid; 5] = [
            queue.into(),
            message_id.into(),
            lock_token.into(),
            delay.into(),
            error.into(),
        ];
        let given_back = if let Some(row) = plans::run(client, &NACK, &args)?.next() {
            let queue_id: i32 = plans::filled(&row, 1, "queue id")?;
            depth::touched(queue_id);
            let notify = plans::filled(&row, 2, "notify")?;
            let ready_now = plans::filled(&row, 3, "ready now")?;
            wakeup::announce(queue_id, queue, notify, ready_now, 1);
            true
        } else {
            let args: [DatumWithOid; 6] = [
                vec![message_id].into(),
                lock_token.into(),
                DeadReason::MaxDeliveries.as_str().into(),
                error.into(),
                queue.into(),
                false.into(),
            ];
            move_to_dead_letter_queue(client, &args)? > 0
        };
        if !given_back {
            return nothing_done(client, queue, false);
        }
        // After the message, as every settle orders its locks.
        if found.max_in_flight.is_some() {
            in_flight::release_one(client, found.queue_id, message_id, lock_token)?;
        }
        Ok(true)
    })
}

/// Extends the lock of one delivery by `lock_timeout` (the queue's when None) from now.
pub fn extend_lock(
    queue: &str,
    message_id: i64,
    lock_token: Uuid,
    lock_timeout: Option<Interval>,
) -> BusResult<bool> {
    access::connect(|client, caller| {
        caller.require(client, queue, Privilege::Consume)?;
        let found = queue::require(client, queue)?;
        let extended = if found.max_in_flight.is_some() {
            extend_capped(client, found.queue_id, message_id, lock_token, lock_timeout)?
        } else {
            let args: [DatumWithOid; 4] = [
                queue.into(),
                message_id.into(),
                lock_token.into(),
                lock_timeout.into(),
            ];
            match plans::run(client, &EXTEND_LOCK, &args)?.next() {
                Some(row) => {
                    if plans::filled::<bool>(&row, 2, "sooner")? {
                        wake_for_sooner_end(plans::filled(&row, 1, "queue id")?);
                    }
                    true
                }
                None => false,
            }
        };
        Ok(extended)
    })
}
