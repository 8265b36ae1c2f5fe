//! Sending, receiving and settling messages. Each verb is one kept statement in the common case; the
//! queue is named in the statement itself so that no separate look-up precedes the work, and only an
//! empty result pays for finding out why (unknown queue, stale token, duplicate).
use std::time::{Duration, Instant};

use pgrx::datum::{DatumWithOid, Interval, TimestampWithTimeZone};
use pgrx::pg_sys::{self, panic::ErrorReport};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::Uuid;

use super::queues::{self, SettingsChange};
use super::read_position::{self, Position};
use crate::access::{self, Caller, Privilege};
use crate::depth;
use crate::datum::{ArrayShape, BigintArray, Jsonb, JsonbArray, UuidArray};
use crate::direct_insert;
use crate::error::{BusError, BusResult};
use crate::gucs;
use crate::plans::{self, Statement};
use crate::validate::{self, required};
use crate::wakeup;

// The queue comes as its id, from the backend's cache of queues (queues::destination): a send is one
// plain INSERT. A send that races a drop of its queue commits a message the worker then removes.
static SEND: Statement = Statement {
    sql: "INSERT INTO bussig.message (queue_id, payload, headers, visible_at, priority, correlation_id, reply_to)
          VALUES ($1, $2, $3, clock_timestamp() + coalesce($4, interval '0'), $5, $6, $7)
          RETURNING message_id",
    args: &[
        pg_sys::INT4OID,
        pg_sys::JSONBOID,
        pg_sys::JSONBOID,
        pg_sys::INTERVALOID,
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
    ],
    writes: true,
};

// A key that expired stays in place until the worker prunes it; ON CONFLICT revives it.
static SEND_DEDUPLICATED: Statement = Statement {
    sql: "WITH q AS (SELECT queue_id, dedup_window FROM bussig.queue WHERE queue_id = $1),
          fresh AS (
              INSERT INTO bussig.dedup AS d (queue_id, dedup_id, expires_at)
              SELECT queue_id, $8, now() + dedup_window FROM q
              ON CONFLICT (queue_id, dedup_id) DO UPDATE SET expires_at = excluded.expires_at
              WHERE d.expires_at <= now()
              RETURNING queue_id
          ),
          sent AS (
              INSERT INTO bussig.message (queue_id, payload, headers, visible_at, priority, correlation_id, reply_to)
              SELECT fresh.queue_id, $2, $3, clock_timestamp() + coalesce($4, interval '0'), $5, $6, $7 FROM fresh
              RETURNING message_id
          )
          SELECT message_id FROM sent",
    args: &[
        pg_sys::INT4OID,
        pg_sys::JSONBOID,
        pg_sys::JSONBOID,
        pg_sys::INTERVALOID,
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
    ],
    writes: true,
};

// The function scan hands the insert the payloads in array order, so ids follow that order.
static SEND_BATCH: Statement = Statement {
    sql: "INSERT INTO bussig.message (queue_id, payload, headers, visible_at, priority)
          SELECT $1, p.payload, $3, clock_timestamp() + coalesce($4, interval '0'), $5
          FROM unnest($2::jsonb[]) AS p(payload)
          RETURNING message_id",
    args: &[
        pg_sys::INT4OID,
        pg_sys::JSONBARRAYOID,
        pg_sys::JSONBOID,
        pg_sys::INTERVALOID,
        pg_sys::INT4OID,
    ],
    writes: true,
};

/// A read: `$picked` chooses the messages (`message_id`, `ready_at` and the `row_ctid` it locked, at
/// most {limit}, with SKIP LOCKED); every read delivers them the same way. The update finds each row by
/// the ctid it locked, not through the primary key again. A row that a commit the statement's snapshot
/// does not see had changed just before it was locked is then left out of this read, ready for the next.
macro_rules! read_statement {
    ($($picked:expr),+) => {
        concat!(
            "WITH q AS (
                 SELECT queue_id, max_deliveries, message_ttl, lock_timeout,
                        dead_letter_queue_id IS NOT NULL AS has_dead_letter_queue, clock_timestamp() AS now
                 FROM bussig.queue WHERE name = $1
             ), picked AS (",
            $($picked),+,
            ")
             UPDATE bussig.message by_ctid
             SET visible_at = q.now + coalesce($2, q.lock_timeout),
                 lock_token = bussig.lock_token(),
                 delivery_count = by_ctid.delivery_count + 1,
                 final_delivery = q.has_dead_letter_queue AND by_ctid.delivery_count + 1 >= q.max_deliveries
             FROM picked, q
             WHERE by_ctid.ctid = picked.row_ctid
             RETURNING by_ctid.message_id, by_ctid.lock_token, by_ctid.subject,
                       coalesce(by_ctid.payload, (SELECT b.payload FROM bussig.body b WHERE b.body_id = by_ctid.body_id)),
                       by_ctid.headers, by_ctid.delivery_count,
                       by_ctid.priority, by_ctid.enqueued_at, by_ctid.correlation_id, by_ctid.reply_to, picked.ready_at,
                       CASE WHEN q.message_ttl IS NOT NULL AND by_ctid.enqueued_at <= q.now - q.message_ttl
                                 THEN 'expired'
                            WHEN q.has_dead_letter_queue AND by_ctid.delivery_count > q.max_deliveries
                                 THEN 'max_deliveries'
                       END AS dead_reason,
                       q.has_dead_letter_queue, q.queue_id"
        )
    };
}

// Locks up to {limit} ready messages in delivery order, skipping rows other consumers hold or have
// already replaced since the statement's snapshot (see superseded.rs). A message past its TTL or its
// last allowed delivery comes back flagged with dead_reason instead of being handed out; the caller
// moves it to the dead-letter queue in the same transaction. Each priority's range is read on its own,
// highest first, and only as far as its ready messages go: a scan of the whole queue's range would
// walk every locked and delayed message of it when none is ready (no skip scan in PostgreSQL 15).
// The nested loop stops pulling, and so locking, once it has {limit} rows.
static READ: Statement = Statement {
    sql: read_statement!(
        "WITH RECURSIVE ",
        queue_priorities!("(SELECT queue_id FROM q)"),
        "
         SELECT ready.message_id, ready.ready_at, ready.row_ctid
         FROM priorities CROSS JOIN LATERAL (
             SELECT in_order.message_id, in_order.visible_at AS ready_at, in_order.ctid AS row_ctid
             FROM bussig.message in_order
             WHERE in_order.queue_id = (SELECT queue_id FROM q) AND in_order.priority = priorities.priority
               AND in_order.visible_at <= (SELECT now FROM q)
               AND (in_order.xmax = '0'::xid OR NOT bussig.superseded(in_order.tableoid, in_order.ctid))
             ORDER BY in_order.visible_at, in_order.message_id
             FOR UPDATE SKIP LOCKED
         ) ready
         LIMIT {limit}"
    ),
    args: &[pg_sys::TEXTOID, pg_sys::INTERVALOID],
    writes: true,
};

// READ from a position in priority $3 ($4 ready_at, $5 message_id; see read_position.rs), so that the
// index scan starts there. Nothing while a message of a higher priority is ready: the caller then
// reads from the head. The probe looks at the front of each higher priority's range, as READ does;
// a queue with no higher priority costs it one index descent.
static READ_FROM: Statement = Statement {
    sql: read_statement!(
        "WITH RECURSIVE ",
        queue_priorities!("(SELECT queue_id FROM q)", " AND in_order_p.priority > $3"),
        "
         SELECT in_order.message_id, in_order.visible_at AS ready_at, in_order.ctid AS row_ctid
         FROM bussig.message in_order
         WHERE in_order.queue_id = (SELECT queue_id FROM q) AND in_order.priority = $3
           AND (in_order.visible_at, in_order.message_id) >= ($4, $5) AND in_order.visible_at <= (SELECT now FROM q)
           AND (in_order.xmax = '0'::xid OR NOT bussig.superseded(in_order.tableoid, in_order.ctid))
           AND NOT EXISTS (
                SELECT FROM priorities CROSS JOIN LATERAL (
                    SELECT FROM bussig.message in_order_head
                    WHERE in_order_head.queue_id = (SELECT queue_id FROM q)
                      AND in_order_head.priority = priorities.priority
                      AND in_order_head.visible_at <= (SELECT now FROM q)
                    LIMIT 1) ready)
         ORDER BY in_order.visible_at, in_order.message_id
         LIMIT {limit}
         FOR UPDATE SKIP LOCKED"
    ),
    args: &[
        pg_sys::TEXTOID,
        pg_sys::INTERVALOID,
        pg_sys::INT4OID,
        pg_sys::TIMESTAMPTZOID,
        pg_sys::INT8OID,
    ],
    writes: true,
};

// Acks take the queue as its id, from queues::destination.
static ACK: Statement = Statement {
    sql: "DELETE FROM bussig.message by_id
          WHERE queue_id = $1 AND message_id = $2 AND lock_token = $3",
    args: &[pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::UUIDOID],
    writes: true,
};

// A listed message goes when its current token is among the listed ones. Tokens are random and each
// belongs to one delivery of one message, so that is the same as matching each id with its own token,
// and it needs no join with the unnested lists (a fifth of an ack's executor time).
static ACK_BATCH: Statement = Statement {
    sql:
        "DELETE FROM bussig.message by_id
          WHERE by_id.message_id = ANY ($2) AND by_id.queue_id = $1 AND by_id.lock_token = ANY ($3)",
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

// Moves messages of queue $5 (of any queue when NULL) to their dead-letter queue: those in $1,
// holding token $2 when one is given, and, unless $6 forces it, only when their last allowed
// delivery has been used.
static DEAD_LETTER: Statement = Statement {
    sql: "UPDATE bussig.message by_id
          SET queue_id = q.dead_letter_queue_id,
              visible_at = clock_timestamp(),
              lock_token = NULL,
              delivery_count = 0,
              final_delivery = false,
              last_error = NULL,
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
                    q.queue_id",
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
    sql: "DELETE FROM bussig.message by_id WHERE message_id = ANY ($1) RETURNING queue_id",
    args: &[pg_sys::INT8ARRAYOID],
    writes: true,
};

static EXTEND_LOCK: Statement = Statement {
    sql:
        "UPDATE bussig.message by_id
          SET visible_at = clock_timestamp() + coalesce($4, q.lock_timeout)
          FROM bussig.queue q
          WHERE q.name = $1 AND by_id.queue_id = q.queue_id AND by_id.message_id = $2 AND by_id.lock_token = $3",
    args: &[
        pg_sys::TEXTOID,
        pg_sys::INT8OID,
        pg_sys::UUIDOID,
        pg_sys::INTERVALOID,
    ],
    writes: true,
};

// Messages a consumer of the dead-letter queue holds right now stay where they are.
static REDRIVE: Statement = Statement {
    sql: "WITH picked AS (
              SELECT in_order.ctid AS row_ctid
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
          WHERE by_ctid.ctid = picked.row_ctid",
    args: &[pg_sys::TEXTOID, pg_sys::INT4OID, pg_sys::INT4OID, pg_sys::INT4OID],
    writes: true,
};

// Ready messages in delivery order, then the rest in the order they will become ready.
static PEEK: Statement = Statement {
    sql: concat!(
        "WITH RECURSIVE q AS (SELECT queue_id, clock_timestamp() AS now FROM bussig.queue WHERE name = $1), ",
        queue_priorities!("(SELECT queue_id FROM q)"),
        "
          (SELECT ready.message_id, 'ready' AS state, ready.visible_at, ready.subject,
                  coalesce(ready.payload, (SELECT b.payload FROM bussig.body b WHERE b.body_id = ready.body_id)),
                  ready.headers, ready.delivery_count, ready.priority, ready.enqueued_at,
                  ready.correlation_id, ready.reply_to
           FROM priorities CROSS JOIN LATERAL (
               SELECT in_order.* FROM bussig.message in_order
               WHERE in_order.queue_id = (SELECT queue_id FROM q) AND in_order.priority = priorities.priority
                 AND in_order.visible_at <= (SELECT now FROM q)
               ORDER BY in_order.visible_at, in_order.message_id
               LIMIT $2) ready
           ORDER BY ready.priority DESC, ready.visible_at, ready.message_id
           LIMIT $2)
          UNION ALL
          (SELECT later.message_id, CASE WHEN later.lock_token IS NULL THEN 'delayed' ELSE 'locked' END,
                  later.visible_at, later.subject,
                  coalesce(later.payload, (SELECT b.payload FROM bussig.body b WHERE b.body_id = later.body_id)),
                  later.headers, later.delivery_count, later.priority, later.enqueued_at, later.correlation_id,
                  later.reply_to
           FROM priorities CROSS JOIN LATERAL (
               SELECT in_order.* FROM bussig.message in_order
               WHERE in_order.queue_id = (SELECT queue_id FROM q) AND in_order.priority = priorities.priority
                 AND in_order.visible_at > (SELECT now FROM q)
               ORDER BY in_order.visible_at, in_order.message_id
               LIMIT $2) later
           ORDER BY later.visible_at, later.priority DESC, later.message_id
           LIMIT $2)
          LIMIT $2"
    ),
    args: &[pg_sys::TEXTOID, pg_sys::INT4OID],
    writes: false,
};

/// Runs DEAD_LETTER: how many messages moved. Readers waiting on their dead-letter queues are woken,
/// and a dead-letter queue that asked for NOTIFY gets it.
fn move_to_dead_letter_queue(
    client: &mut SpiClient<'_>,
    args: &[DatumWithOid<'_>],
) -> BusResult<i64> {
    let mut moved = 0;
    for row in plans::run(client, &DEAD_LETTER, args)? {
        let queue_id: i32 = row.get(1)?.expect("NOT NULL");
        depth::removed(row.get(3)?.expect("NOT NULL"), 1);
        depth::added(queue_id, 1);
        match row.get::<String>(2)? {
            Some(notify_name) => wakeup::announce(queue_id, &notify_name, true, true, 1),
            None => wakeup::note_ready(queue_id, 1),
        }
        moved += 1;
    }
    Ok(moved)
}

/// How many rows a kept statement touched, as a count.
fn processed(
    client: &mut SpiClient<'_>,
    statement: &'static Statement,
    args: &[DatumWithOid<'_>],
) -> BusResult<i64> {
    Ok(plans::run(client, statement, args)?.len() as i64)
}

/// A statement that found nothing: the queue must exist, otherwise the answer is simply "no".
fn nothing_done<T>(client: &mut SpiClient<'_>, queue: &str, answer: T) -> BusResult<T> {
    queues::require(client, queue)?;
    Ok(answer)
}

/// What send and publish both take, checked.
pub struct Outgoing {
    pub payload: Jsonb,
    pub headers: Option<Jsonb>,
    pub delay: Option<Interval>,
    pub priority: i32,
}

impl Outgoing {
    pub fn check(
        payload: Option<Jsonb>,
        headers: Option<Jsonb>,
        delay: Option<Interval>,
        priority: Option<i32>,
    ) -> BusResult<Outgoing> {
        let payload = required(payload, "payload")?;
        let headers = check_headers(headers)?;
        check_size(payload.size(), headers)?;
        Ok(Outgoing {
            payload,
            headers,
            delay: validate::delay(delay)?,
            priority: required(priority, "priority")?,
        })
    }
}

pub fn check_headers(headers: Option<Jsonb>) -> BusResult<Option<Jsonb>> {
    match headers {
        Some(headers) if !headers.is_object() => Err(BusError::invalid(
            "headers",
            "they must be a JSON object, such as '{\"key\": \"value\"}'",
        )),
        headers => Ok(headers),
    }
}

pub fn check_size(payload_size: usize, headers: Option<Jsonb>) -> BusResult<()> {
    let size = payload_size + headers.map_or(0, |headers| headers.size());
    let limit = gucs::MAX_MESSAGE_SIZE.get();
    if size > limit as usize {
        return Err(BusError::MessageTooLarge { size, limit });
    }
    Ok(())
}

/// The queue a send goes to, created first when it is unknown and auto-creation is on.
fn destination(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    queue: &str,
) -> BusResult<queues::Destination> {
    match caller.require(client, queue, Privilege::Send) {
        Err(BusError::UnknownQueue(_)) => {}
        checked => checked?,
    }
    if let Some(found) = queues::destination(client, queue)? {
        return Ok(found);
    }
    if !gucs::AUTO_CREATE_QUEUES.get() {
        return Err(BusError::UnknownQueue(queue.to_string()));
    }
    queues::create(client, caller, queue, SettingsChange::default(), None)?;
    queues::require_destination(client, queue)
}

/// Runs a send into `found`: written directly when `direct` describes the messages and the table
/// allows it, else by `statement` with `args`. Returns the new message ids (none for a duplicate).
/// Waiting readers are woken, and the queue's NOTIFY sent, at commit.
fn insert_messages(
    client: &mut SpiClient<'_>,
    queue: &str,
    found: queues::Destination,
    delay: Option<Interval>,
    direct: Option<&direct_insert::Messages>,
    statement: &'static Statement,
    args: &[DatumWithOid<'_>],
) -> BusResult<Vec<i64>> {
    let ids = match direct.and_then(direct_insert::insert) {
        Some(ids) => ids,
        None => plans::first_column(client, statement, args)?,
    };
    announce(queue, found, delay, &ids);
    Ok(ids)
}

/// A send with no statement to run (see `access::connect_unless_direct`): a queue this backend has
/// cached, and messages the table takes directly. None, with nothing written, otherwise.
fn send_directly<'a>(
    queue: &str,
    delay: Option<Interval>,
    messages: impl FnOnce(i32) -> direct_insert::Messages<'a>,
) -> Option<Vec<i64>> {
    let found = queues::cached_destination(queue)?;
    let ids = direct_insert::insert(&messages(found.queue_id))?;
    announce(queue, found, delay, &ids);
    Some(ids)
}

/// Waiting readers are woken, and the queue's NOTIFY sent, at commit.
fn announce(queue: &str, found: queues::Destination, delay: Option<Interval>, ids: &[i64]) {
    depth::added(found.queue_id, ids.len());
    if !ids.is_empty() {
        let ready_now = delay.is_none_or(|delay| validate::is_zero(&delay));
        let count = u32::try_from(ids.len()).unwrap_or(u32::MAX);
        wakeup::announce(found.queue_id, queue, found.notify, ready_now, count);
    }
}

#[allow(clippy::too_many_arguments)]
#[pg_extern]
fn send(
    queue: Option<&str>,
    payload: Option<Jsonb>,
    headers: default!(Option<Jsonb>, "NULL"),
    delay: default!(Option<Interval>, "NULL"),
    priority: default!(Option<i32>, 0),
    dedup_id: default!(Option<&str>, "NULL"),
    correlation_id: default!(Option<&str>, "NULL"),
    reply_to: default!(Option<&str>, "NULL"),
) -> Result<Option<i64>, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let Outgoing {
        payload,
        headers,
        delay,
        priority,
    } = Outgoing::check(payload, headers, delay, priority)?;
    let payloads = [payload.into_datum().expect("a payload is a datum")];
    let messages = |queue_id| direct_insert::Messages {
        queue_id,
        payloads: &payloads,
        headers: headers.and_then(IntoDatum::into_datum),
        delay,
        priority,
        correlation_id,
        reply_to,
    };
    let direct = || {
        dedup_id
            .is_none()
            .then(|| send_directly(queue, delay, messages))
            .flatten()
    };
    let ids = access::connect_unless_direct(direct, |client, caller| {
        let found = destination(client, caller, queue)?;
        let messages = messages(found.queue_id);
        let mut args: Vec<DatumWithOid> = vec![
            found.queue_id.into(),
            payload.into(),
            headers.into(),
            delay.into(),
            priority.into(),
            correlation_id.into(),
            reply_to.into(),
        ];
        let (statement, direct) = match dedup_id {
            Some(dedup_id) => {
                args.push(dedup_id.into());
                (&SEND_DEDUPLICATED, None)
            }
            None => (&SEND, Some(&messages)),
        };
        insert_messages(client, queue, found, delay, direct, statement, &args)
    })?;
    Ok(ids.first().copied())
}

#[pg_extern]
fn send_batch(
    queue: Option<&str>,
    payloads: Option<JsonbArray>,
    headers: default!(Option<Jsonb>, "NULL"),
    delay: default!(Option<Interval>, "NULL"),
    priority: default!(Option<i32>, 0),
) -> Result<SetOfIterator<'static, i64>, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let payloads = required(payloads, "payloads")?;
    let headers = check_headers(headers)?;
    let delay = validate::delay(delay)?;
    let priority = required(priority, "priority")?;
    let (count, any_null) = payloads.shape();
    if any_null {
        return Err(BusError::NullArgument("every element of payloads").into());
    }
    let elements: Vec<pg_sys::Datum> = if count > 0 {
        let elements = payloads.elements();
        let largest = elements.iter().map(Jsonb::size).max().unwrap_or(0);
        check_size(largest, headers)?;
        elements
            .into_iter()
            .filter_map(IntoDatum::into_datum)
            .collect()
    } else {
        Vec::new()
    };
    let messages = |queue_id| direct_insert::Messages {
        queue_id,
        payloads: &elements,
        headers: headers.and_then(IntoDatum::into_datum),
        delay,
        priority,
        correlation_id: None,
        reply_to: None,
    };
    let direct = || send_directly(queue, delay, messages);
    let mut ids = access::connect_unless_direct(direct, |client, caller| {
        let found = destination(client, caller, queue)?;
        let args: [DatumWithOid; 5] = [
            found.queue_id.into(),
            payloads.into(),
            headers.into(),
            delay.into(),
            priority.into(),
        ];
        let messages = messages(found.queue_id);
        insert_messages(
            client,
            queue,
            found,
            delay,
            Some(&messages),
            &SEND_BATCH,
            &args,
        )
    })?;
    ids.sort_unstable();
    Ok(SetOfIterator::new(ids))
}

struct Delivery {
    /// The message's id, priority and when it became ready: its place in delivery order.
    position: Position,
    lock_token: Uuid,
    subject: Option<String>,
    payload: Jsonb,
    headers: Option<Jsonb>,
    delivery_count: i32,
    enqueued_at: TimestampWithTimeZone,
    correlation_id: Option<String>,
    reply_to: Option<String>,
}

/// A message that may not be delivered again: (message_id, reason, whether its queue has a
/// dead-letter queue).
pub type Dead = (i64, String, bool);

/// Moves dead messages of `queue` (of any queue when None) to their dead-letter queue, in the
/// caller's transaction; in a queue without one, expired messages are deleted.
pub fn bury(client: &mut SpiClient<'_>, queue: Option<&str>, dead: Vec<Dead>) -> BusResult<()> {
    for reason in ["expired", "max_deliveries"] {
        let (moved, dropped): (Vec<_>, Vec<_>) = dead
            .iter()
            .filter(|(_, why, _)| why == reason)
            .partition(|(_, _, has_dead_letter_queue)| *has_dead_letter_queue);
        let ids = |list: Vec<&Dead>| list.iter().map(|(id, _, _)| *id).collect::<Vec<i64>>();
        if !moved.is_empty() {
            let args: [DatumWithOid; 6] = [
                ids(moved).into(),
                Option::<Uuid>::None.into(),
                reason.into(),
                Option::<&str>::None.into(),
                queue.into(),
                true.into(),
            ];
            move_to_dead_letter_queue(client, &args)?;
        }
        if !dropped.is_empty() {
            for row in plans::run(client, &DELETE_MESSAGES, &[ids(dropped).into()])? {
                depth::removed(row.get(1)?.expect("NOT NULL"), 1);
            }
        }
    }
    Ok(())
}

fn receive(
    client: &mut SpiClient<'_>,
    queue: &str,
    max_messages: i32,
    lock_timeout: Option<Interval>,
) -> BusResult<Vec<Delivery>> {
    let mut delivered = Vec::new();
    loop {
        let wanted = max_messages - delivered.len() as i32;
        let start = read_position::recall(queue);
        let rows = match start {
            Some(from) => plans::run_limited(
                client,
                &READ_FROM,
                wanted,
                &[
                    queue.into(),
                    lock_timeout.into(),
                    from.priority.into(),
                    from.ready_at.into(),
                    from.message_id.into(),
                ],
            )?,
            None => {
                plans::run_limited(client, &READ, wanted, &[queue.into(), lock_timeout.into()])?
            }
        };
        let mut dead = Vec::new();
        let mut returned = 0;
        let mut first: Option<Position> = None;
        for row in rows {
            if returned == 0 {
                depth::touched(row.get(14)?.expect("NOT NULL"));
            }
            returned += 1;
            let position = Position {
                priority: row.get(7)?.expect("NOT NULL"),
                ready_at: row.get(11)?.expect("NOT NULL"),
                message_id: row.get(1)?.expect("NOT NULL"),
            };
            if first.is_none_or(|first| position < first) {
                first = Some(position);
            }
            if let Some(reason) = row.get::<String>(12)? {
                dead.push((
                    position.message_id,
                    reason,
                    row.get::<bool>(13)?.expect("NOT NULL"),
                ));
                continue;
            }
            delivered.push(Delivery {
                position,
                lock_token: row.get(2)?.expect("NOT NULL"),
                subject: row.get(3)?,
                payload: row.get(4)?.expect("NOT NULL"),
                headers: row.get(5)?,
                delivery_count: row.get(6)?.expect("NOT NULL"),
                enqueued_at: row.get(8)?.expect("NOT NULL"),
                correlation_id: row.get(9)?,
                reply_to: row.get(10)?,
            });
        }
        let took_all = returned == wanted;
        // Only a read that found as many as it asked for is in a backlog worth a position; one that
        // came up short from a position reads the rest from the head.
        match first.filter(|_| took_all) {
            Some(first) => read_position::remember(queue, first),
            None => read_position::forget(queue),
        }
        let more_may_be_ready = took_all && !dead.is_empty();
        bury(client, Some(queue), dead)?;
        if start.is_some() && !took_all {
            continue;
        }
        if returned == 0 && delivered.is_empty() {
            return nothing_done(client, queue, delivered);
        }
        if !more_may_be_ready {
            break;
        }
    }
    // RETURNING gives no order: restore delivery order.
    delivered.sort_by_key(|delivery| delivery.position);
    Ok(delivered)
}

// Seconds until the first message that was not ready when the last read began ($2, seconds since the
// epoch) becomes ready; negative when it already has. Measured from that moment, not from now: a delay
// that runs out between the read and this probe must end the sleep, not be missed until the wait ends.
// A writing statement, so that it takes a new snapshot and sees messages committed during the wait.
static NEXT_READY: Statement = Statement {
    sql: concat!(
        "WITH RECURSIVE ",
        queue_priorities!("$1"),
        "
         SELECT extract(epoch FROM min(later.visible_at) - clock_timestamp())::float8
         FROM priorities CROSS JOIN LATERAL (
             SELECT in_order.visible_at FROM bussig.message in_order
             WHERE in_order.queue_id = $1 AND in_order.priority = priorities.priority
               AND in_order.visible_at > to_timestamp($2)
             ORDER BY in_order.visible_at LIMIT 1) later"
    ),
    args: &[pg_sys::INT4OID, pg_sys::FLOAT8OID],
    writes: true,
};

/// The wall clock as seconds since the epoch, the clock PostgreSQL's clock_timestamp() reads.
fn epoch_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// Reads what is ready; with a wait, sleeps until a commit makes messages ready in the queue, a
/// delay or lock runs out, or the wait is over, and reads again.
/// The arguments of read and ack_and_read, checked.
struct ReadRequest {
    max_messages: i32,
    lock_timeout: Option<Interval>,
    wait: Duration,
}

impl ReadRequest {
    fn check(
        max_messages: Option<i32>,
        lock_timeout: Option<Interval>,
        wait: Option<Interval>,
    ) -> BusResult<ReadRequest> {
        let wait = match wait {
            Some(wait) => {
                validate::not_negative(&wait, "wait")?;
                Duration::from_micros(wait.as_micros().clamp(0, u64::MAX as i128) as u64)
            }
            None => Duration::ZERO,
        };
        Ok(ReadRequest {
            max_messages: validate::max_messages(max_messages)?,
            lock_timeout: validate::lock_timeout(lock_timeout)?,
            wait,
        })
    }
}

type DeliveryRow = (
    i64,
    Uuid,
    Option<String>,
    Jsonb,
    Option<Jsonb>,
    i32,
    i32,
    TimestampWithTimeZone,
    Option<String>,
    Option<String>,
);

/// The rows read and ack_and_read return.
fn deliveries(delivered: Vec<Delivery>) -> TableIterator<'static, DeliveryRow> {
    TableIterator::new(delivered.into_iter().map(|d| {
        (
            d.position.message_id,
            d.lock_token,
            d.subject,
            d.payload,
            d.headers,
            d.delivery_count,
            d.position.priority,
            d.enqueued_at,
            d.correlation_id,
            d.reply_to,
        )
    }))
}

/// Deletes the acknowledged messages of `queue` whose lock tokens still hold: how many.
fn acknowledge(
    client: &mut SpiClient<'_>,
    queue: &str,
    (message_ids, lock_tokens): (BigintArray, UuidArray),
) -> BusResult<i64> {
    let queue_id = queues::require_destination(client, queue)?.queue_id;
    let acked = processed(
        client,
        &ACK_BATCH,
        &[queue_id.into(), message_ids.into(), lock_tokens.into()],
    )?;
    depth::removed(queue_id, acked as usize);
    Ok(acked)
}

/// Reads as `read` does, acknowledging `acks` first in the same call (ack_and_read).
fn receive_waiting(
    queue: &str,
    request: ReadRequest,
    mut acks: Option<(BigintArray, UuidArray)>,
) -> BusResult<Vec<Delivery>> {
    let ReadRequest {
        max_messages,
        lock_timeout,
        mut wait,
    } = request;
    let started = Instant::now();
    let mut waiting: Option<(i32, wakeup::Waiting)> = None;
    loop {
        let read_began = epoch_seconds();
        let delivered = access::connect(|client, caller| {
            caller.require(client, queue, Privilege::Consume)?;
            if let Some(acks) = acks.take() {
                // Acks commit with the call: a wait that a timeout or cancel ends would undo them.
                if acknowledge(client, queue, acks)? > 0 {
                    wait = Duration::ZERO;
                }
            }
            receive(client, queue, max_messages, lock_timeout)
        })?;
        let deadline = started + wait;
        let now = Instant::now();
        // Waiting could never show a transaction-long snapshot anything new.
        if !delivered.is_empty() || now >= deadline || plans::snapshot_is_fixed() {
            if let Some((_, waiting)) = &waiting {
                waiting.done(delivered.len() == max_messages as usize);
            }
            return Ok(delivered);
        }
        let Some(waiting) = &waiting else {
            // Register, then read once more before the first sleep: a commit between the read above
            // and the registration would otherwise go unnoticed.
            let queue_id = access::connect(|client, _| queues::require(client, queue))?.queue_id;
            let wants = u32::try_from(max_messages).unwrap_or(1);
            waiting = Some((queue_id, wakeup::Waiting::register(queue_id, wants)));
            continue;
        };
        waiting.1.rearm();
        let next_ready = access::connect(|client, _| -> BusResult<Option<f64>> {
            let args = [waiting.0.into(), read_began.into()];
            Ok(plans::first_value(client, &NEXT_READY, &args)?)
        })?;
        let until_ready = next_ready.map_or(Duration::MAX, |seconds| {
            Duration::from_secs_f64(seconds.max(0.0))
        });
        waiting.1.sleep((deadline - now).min(until_ready));
    }
}

#[allow(clippy::type_complexity)]
#[pg_extern]
fn read(
    queue: Option<&str>,
    max_messages: default!(Option<i32>, 1),
    lock_timeout: default!(Option<Interval>, "NULL"),
    wait: default!(Option<Interval>, "NULL"),
) -> Result<
    TableIterator<
        'static,
        (
            name!(message_id, i64),
            name!(lock_token, Uuid),
            name!(subject, Option<String>),
            name!(payload, Jsonb),
            name!(headers, Option<Jsonb>),
            name!(delivery_count, i32),
            name!(priority, i32),
            name!(enqueued_at, TimestampWithTimeZone),
            name!(correlation_id, Option<String>),
            name!(reply_to, Option<String>),
        ),
    >,
    ErrorReport,
> {
    let queue = validate::queue_name(queue)?;
    let request = ReadRequest::check(max_messages, lock_timeout, wait)?;
    Ok(deliveries(receive_waiting(queue, request, None)?))
}

/// The three arguments that name one delivery of one message.
fn delivery(
    queue: Option<&str>,
    message_id: Option<i64>,
    lock_token: Option<Uuid>,
) -> BusResult<(&str, i64, Uuid)> {
    Ok((
        validate::queue_name(queue)?,
        required(message_id, "message_id")?,
        required(lock_token, "lock_token")?,
    ))
}

/// Runs a settle statement for one delivery: true when it applied, false for a stale token.
fn settle(
    queue: &str,
    statement: &'static Statement,
    args: &[DatumWithOid<'_>],
) -> BusResult<bool> {
    access::connect(|client, caller| {
        caller.require(client, queue, Privilege::Consume)?;
        if processed(client, statement, args)? > 0 {
            return Ok(true);
        }
        nothing_done(client, queue, false)
    })
}

#[pg_extern]
fn ack(
    queue: Option<&str>,
    message_id: Option<i64>,
    lock_token: Option<Uuid>,
) -> Result<bool, ErrorReport> {
    let (queue, message_id, lock_token) = delivery(queue, message_id, lock_token)?;
    Ok(access::connect(|client, caller| {
        caller.require(client, queue, Privilege::Consume)?;
        let queue_id = queues::require_destination(client, queue)?.queue_id;
        let args = [queue_id.into(), message_id.into(), lock_token.into()];
        let acked = processed(client, &ACK, &args)?;
        depth::removed(queue_id, acked as usize);
        Ok(acked > 0)
    })?)
}

/// Message ids and their lock tokens, checked to pair up one to one.
fn settled_pairs(
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

#[pg_extern]
fn ack_batch(
    queue: Option<&str>,
    message_ids: Option<BigintArray>,
    lock_tokens: Option<UuidArray>,
) -> Result<i64, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let (message_ids, lock_tokens) = settled_pairs(
        required(message_ids, "message_ids")?,
        required(lock_tokens, "lock_tokens")?,
    )?;
    Ok(access::connect(|client, caller| {
        caller.require(client, queue, Privilege::Consume)?;
        acknowledge(client, queue, (message_ids, lock_tokens))
    })?)
}

/// The consumer loop in one call: acknowledges the previous batch (stale tokens are skipped, as
/// by ack_batch) and reads the next, in one transaction and one round trip. NULL arrays ack nothing.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
#[pg_extern]
fn ack_and_read(
    queue: Option<&str>,
    message_ids: default!(Option<BigintArray>, "NULL"),
    lock_tokens: default!(Option<UuidArray>, "NULL"),
    max_messages: default!(Option<i32>, 1),
    lock_timeout: default!(Option<Interval>, "NULL"),
    wait: default!(Option<Interval>, "NULL"),
) -> Result<
    TableIterator<
        'static,
        (
            name!(message_id, i64),
            name!(lock_token, Uuid),
            name!(subject, Option<String>),
            name!(payload, Jsonb),
            name!(headers, Option<Jsonb>),
            name!(delivery_count, i32),
            name!(priority, i32),
            name!(enqueued_at, TimestampWithTimeZone),
            name!(correlation_id, Option<String>),
            name!(reply_to, Option<String>),
        ),
    >,
    ErrorReport,
> {
    let queue = validate::queue_name(queue)?;
    let settled = match (message_ids, lock_tokens) {
        (None, None) => None,
        (Some(ids), Some(tokens)) => Some(settled_pairs(ids, tokens)?),
        (None, Some(_)) => return Err(BusError::NullArgument("message_ids").into()),
        (Some(_), None) => return Err(BusError::NullArgument("lock_tokens").into()),
    };
    let request = ReadRequest::check(max_messages, lock_timeout, wait)?;
    Ok(deliveries(receive_waiting(queue, request, settled)?))
}

#[pg_extern]
fn nack(
    queue: Option<&str>,
    message_id: Option<i64>,
    lock_token: Option<Uuid>,
    delay: default!(Option<Interval>, "NULL"),
    error: default!(Option<&str>, "NULL"),
) -> Result<bool, ErrorReport> {
    let (queue, message_id, lock_token) = delivery(queue, message_id, lock_token)?;
    let delay = validate::delay(delay)?;
    Ok(access::connect(|client, caller| -> BusResult<bool> {
        caller.require(client, queue, Privilege::Consume)?;
        let args: [DatumWithOid; 5] = [
            queue.into(),
            message_id.into(),
            lock_token.into(),
            delay.into(),
            error.into(),
        ];
        if let Some(row) = plans::run(client, &NACK, &args)?.next() {
            let queue_id: i32 = row.get(1)?.expect("NOT NULL");
            depth::touched(queue_id);
            wakeup::announce(
                queue_id,
                queue,
                row.get(2)?.expect("NOT NULL"),
                row.get(3)?.expect("NOT NULL"),
                1,
            );
            return Ok(true);
        }
        let args: [DatumWithOid; 6] = [
            vec![message_id].into(),
            lock_token.into(),
            "max_deliveries".into(),
            error.into(),
            queue.into(),
            false.into(),
        ];
        if move_to_dead_letter_queue(client, &args)? > 0 {
            return Ok(true);
        }
        nothing_done(client, queue, false)
    })?)
}

#[pg_extern]
fn extend_lock(
    queue: Option<&str>,
    message_id: Option<i64>,
    lock_token: Option<Uuid>,
    lock_timeout: default!(Option<Interval>, "NULL"),
) -> Result<bool, ErrorReport> {
    let (queue, message_id, lock_token) = delivery(queue, message_id, lock_token)?;
    let lock_timeout = validate::lock_timeout(lock_timeout)?;
    Ok(settle(
        queue,
        &EXTEND_LOCK,
        &[
            queue.into(),
            message_id.into(),
            lock_token.into(),
            lock_timeout.into(),
        ],
    )?)
}

#[pg_extern]
fn dead_letter(
    queue: Option<&str>,
    message_id: Option<i64>,
    lock_token: Option<Uuid>,
    reason: default!(Option<&str>, "'rejected'"),
    error: default!(Option<&str>, "NULL"),
) -> Result<bool, ErrorReport> {
    let (queue, message_id, lock_token) = delivery(queue, message_id, lock_token)?;
    let reason = required(reason, "reason")?;
    Ok(access::connect(|client, caller| -> BusResult<bool> {
        caller.require(client, queue, Privilege::Consume)?;
        let args: [DatumWithOid; 6] = [
            vec![message_id].into(),
            lock_token.into(),
            reason.into(),
            error.into(),
            queue.into(),
            true.into(),
        ];
        if move_to_dead_letter_queue(client, &args)? > 0 {
            return Ok(true);
        }
        if queues::require(client, queue)?
            .dead_letter_queue_id
            .is_none()
        {
            return Err(BusError::NoDeadLetterQueue(queue.to_string()));
        }
        Ok(false)
    })?)
}

#[pg_extern]
fn redrive(
    queue: Option<&str>,
    max_messages: default!(Option<i32>, "NULL"),
) -> Result<i64, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    if let Some(max) = max_messages {
        if max < 1 {
            return Err(BusError::invalid("max_messages", format!("{max} is less than 1")).into());
        }
    }
    Ok(access::connect(|client, caller| -> BusResult<i64> {
        caller.require(client, queue, Privilege::Manage)?;
        let found = queues::require(client, queue)?;
        let Some(dead_letter_queue_id) = found.dead_letter_queue_id else {
            return Err(BusError::NoDeadLetterQueue(queue.to_string()));
        };
        let args: [DatumWithOid; 4] = [
            queue.into(),
            dead_letter_queue_id.into(),
            found.queue_id.into(),
            max_messages.into(),
        ];
        let redriven = processed(client, &REDRIVE, &args)?;
        depth::removed(dead_letter_queue_id, redriven as usize);
        depth::added(found.queue_id, redriven as usize);
        if redriven > 0 {
            let count = u32::try_from(redriven).unwrap_or(u32::MAX);
            wakeup::announce(found.queue_id, queue, found.notify, true, count);
        }
        Ok(redriven)
    })?)
}

#[allow(clippy::type_complexity)]
#[pg_extern]
fn peek(
    queue: Option<&str>,
    max_messages: default!(Option<i32>, 10),
) -> Result<
    TableIterator<
        'static,
        (
            name!(message_id, i64),
            name!(state, String),
            name!(visible_at, TimestampWithTimeZone),
            name!(subject, Option<String>),
            name!(payload, Jsonb),
            name!(headers, Option<Jsonb>),
            name!(delivery_count, i32),
            name!(priority, i32),
            name!(enqueued_at, TimestampWithTimeZone),
            name!(correlation_id, Option<String>),
            name!(reply_to, Option<String>),
        ),
    >,
    ErrorReport,
> {
    let queue = validate::queue_name(queue)?;
    let max_messages = validate::max_messages(max_messages)?;
    let rows = access::connect(|client, caller| -> BusResult<Vec<_>> {
        caller.require(client, queue, Privilege::Consume)?;
        let mut rows = Vec::new();
        for row in plans::run(client, &PEEK, &[queue.into(), max_messages.into()])? {
            rows.push((
                row.get::<i64>(1)?.expect("NOT NULL"),
                row.get::<String>(2)?.expect("NOT NULL"),
                row.get::<TimestampWithTimeZone>(3)?.expect("NOT NULL"),
                row.get::<String>(4)?,
                row.get::<Jsonb>(5)?.expect("NOT NULL"),
                row.get::<Jsonb>(6)?,
                row.get::<i32>(7)?.expect("NOT NULL"),
                row.get::<i32>(8)?.expect("NOT NULL"),
                row.get::<TimestampWithTimeZone>(9)?.expect("NOT NULL"),
                row.get::<String>(10)?,
                row.get::<String>(11)?,
            ));
        }
        if rows.is_empty() {
            return nothing_done(client, queue, rows);
        }
        Ok(rows)
    })?;
    Ok(TableIterator::new(rows))
}
