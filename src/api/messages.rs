//! send, send_batch, read, ack_and_read, ack, ack_batch, nack, extend_lock, dead_letter, redrive and
//! peek: their arguments checked, the work done in `message`.
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::Uuid;

use crate::error::{BusError, BusResult};
use crate::message::peek::message_row;
use crate::message::receive::{receive_waiting, Delivery, ReadRequest};
use crate::message::send::{self, check_headers, Extras, Outgoing};
use crate::message::{dead_letter, group, peek, reply, settle};
use crate::pg::datum::{BigintArray, Jsonb, JsonbArray, UuidArray};
use crate::validate::{self, required};

sends_one! {
    fn send(queue) -> Option<i64> = validate::queue_name, send::one
}

#[pg_extern]
fn send_batch(
    queue: Option<&str>,
    payloads: Option<JsonbArray>,
    headers: default!(Option<Jsonb>, "NULL"),
    delay: default!(Option<Interval>, "NULL"),
    priority: default!(Option<i32>, 0),
    group_ids: default!(Option<Vec<Option<String>>>, "NULL"),
) -> Result<SetOfIterator<'static, i64>, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let payloads = required(payloads, "payloads")?;
    let headers = check_headers(headers)?;
    let delay = validate::delay(delay)?;
    let priority = required(priority, "priority")?;
    Ok(SetOfIterator::new(send::batch(
        queue, payloads, headers, delay, priority, group_ids,
    )?))
}

type DeliveryRow = message_row!(i64, Uuid);

/// Emits a `#[pg_extern] fn` returning messages as rows: the `$lead` columns, then those of every
/// listing of messages, named (the bodies return `message_row!` tuples: the lists agree or the build
/// fails). A whole item, since `#[pg_extern]` reads the return type before any macro in it expands.
macro_rules! returns_messages {
    ($(#[$($attr:tt)*])* fn $name:ident($($params:tt)*) -> ($($lead:tt)*) $body:tt) => {
        super::returns_table! {
            $(#[$($attr)*])*
            fn $name($($params)*) -> (
                $($lead)*
                name!(subject, Option<String>),
                name!(payload, Jsonb),
                name!(headers, Option<Jsonb>),
                name!(delivery_count, i32),
                name!(priority, i32),
                name!(enqueued_at, TimestampWithTimeZone),
                name!(correlation_id, Option<String>),
                name!(reply_to, Option<String>),
                name!(group_id, Option<String>),
            ) $body
        }
    };
}

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
            d.group_id,
        )
    }))
}

returns_messages! {
    fn read(
        queue: Option<&str>,
        max_messages: default!(Option<i32>, 1),
        lock_timeout: default!(Option<Interval>, "NULL"),
        wait: default!(Option<Interval>, "NULL"),
    ) -> (name!(message_id, i64), name!(lock_token, Uuid),) {
        let queue = validate::queue_name(queue)?;
        let request = ReadRequest::check(max_messages, lock_timeout, wait)?;
        Ok(deliveries(receive_waiting(queue, request, None)?))
    }
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

#[pg_extern]
fn ack(
    queue: Option<&str>,
    message_id: Option<i64>,
    lock_token: Option<Uuid>,
) -> Result<bool, ErrorReport> {
    let (queue, message_id, lock_token) = delivery(queue, message_id, lock_token)?;
    Ok(settle::ack(queue, message_id, lock_token)?)
}

#[pg_extern]
fn ack_batch(
    queue: Option<&str>,
    message_ids: Option<BigintArray>,
    lock_tokens: Option<UuidArray>,
) -> Result<i64, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let pairs = settle::settled_pairs(
        required(message_ids, "message_ids")?,
        required(lock_tokens, "lock_tokens")?,
    )?;
    Ok(settle::ack_batch(queue, pairs)?)
}

returns_messages! {
    /// The consumer loop in one call: acknowledges the previous batch (stale tokens are skipped, as
    /// by ack_batch) and reads the next, in one transaction and one round trip. NULL arrays ack nothing.
    #[allow(clippy::too_many_arguments)]
    fn ack_and_read(
        queue: Option<&str>,
        message_ids: default!(Option<BigintArray>, "NULL"),
        lock_tokens: default!(Option<UuidArray>, "NULL"),
        max_messages: default!(Option<i32>, 1),
        lock_timeout: default!(Option<Interval>, "NULL"),
        wait: default!(Option<Interval>, "NULL"),
    ) -> (name!(message_id, i64), name!(lock_token, Uuid),) {
        let queue = validate::queue_name(queue)?;
        let settled = match (message_ids, lock_tokens) {
            (None, None) => None,
            (Some(ids), Some(tokens)) => Some(settle::settled_pairs(ids, tokens)?),
            (None, Some(_)) => return Err(BusError::NullArgument("message_ids").into()),
            (Some(_), None) => return Err(BusError::NullArgument("lock_tokens").into()),
        };
        let request = ReadRequest::check(max_messages, lock_timeout, wait)?;
        Ok(deliveries(receive_waiting(queue, request, settled)?))
    }
}

/// Acknowledges a request and sends `payload` to its `reply_to` queue, correlated with it: the reply's
/// id, or NULL for a stale token.
#[pg_extern]
fn reply(
    queue: Option<&str>,
    message_id: Option<i64>,
    lock_token: Option<Uuid>,
    payload: Option<Jsonb>,
    headers: default!(Option<Jsonb>, "NULL"),
) -> Result<Option<i64>, ErrorReport> {
    let (queue, message_id, lock_token) = delivery(queue, message_id, lock_token)?;
    let payload = required(payload, "payload")?;
    let headers = check_headers(headers)?;
    Ok(reply::reply(
        queue, message_id, lock_token, payload, headers,
    )?)
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
    Ok(settle::nack(queue, message_id, lock_token, delay, error)?)
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
    Ok(settle::extend_lock(
        queue,
        message_id,
        lock_token,
        lock_timeout,
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
    Ok(dead_letter::one(
        queue, message_id, lock_token, reason, error,
    )?)
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
    Ok(dead_letter::redrive(queue, max_messages)?)
}

returns_messages! {
    fn peek(
        queue: Option<&str>,
        max_messages: default!(Option<i32>, 10),
    ) -> (
        name!(message_id, i64),
        name!(state, String),
        name!(visible_at, TimestampWithTimeZone),
    ) {
        let queue = validate::queue_name(queue)?;
        let max_messages = validate::max_messages(max_messages)?;
        Ok(TableIterator::new(peek::peek(queue, max_messages)?))
    }
}

/// The groups of `queue` whose head is not ready (locked, waiting for a retry, or delayed): what holds
/// each group's later messages back.
#[allow(clippy::type_complexity)]
#[pg_extern]
fn blocked_groups(
    queue: Option<&str>,
) -> Result<
    TableIterator<
        'static,
        (
            name!(group_id, String),
            name!(head_message_id, i64),
            name!(state, String),
            name!(since, TimestampWithTimeZone),
        ),
    >,
    ErrorReport,
> {
    let queue = validate::queue_name(queue)?;
    Ok(TableIterator::new(group::blocked_in(queue)?))
}
