//! subscribe, unsubscribe, heartbeat, publish, publish_batch and match: their arguments checked, the
//! work done in `topic`.
use pgrx::datum::Interval;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::message::send::{check_headers, Extras, Outgoing};
use crate::pg::datum::{Jsonb, JsonbArray};
use crate::topic::{checked_pattern, checked_subject, publish, subscription};
use crate::validate::{self, required};

#[pg_extern]
fn subscribe(
    queue: Option<&str>,
    pattern: Option<&str>,
    ttl: default!(Option<Interval>, "NULL"),
) -> Result<bool, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let pattern = checked_pattern(pattern)?;
    if let Some(ttl) = &ttl {
        validate::positive(ttl, "ttl")?;
    }
    Ok(subscription::subscribe(queue, pattern, ttl)?)
}

#[pg_extern]
fn unsubscribe(queue: Option<&str>, pattern: Option<&str>) -> Result<bool, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let pattern = checked_pattern(pattern)?;
    Ok(subscription::unsubscribe(queue, pattern)?)
}

/// True when the queue is ephemeral and now lives another ttl; false for a queue that is not.
#[pg_extern]
fn heartbeat(queue: Option<&str>) -> Result<bool, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    Ok(subscription::heartbeat(queue)?)
}

sends_one! {
    fn publish(subject) -> i32 = checked_subject, |subject, outgoing, extras| {
        publish::one(subject, outgoing, extras).map(|queues| queues as i32)
    }
}

#[pg_extern]
fn publish_batch(
    subjects: Option<Vec<Option<String>>>,
    payloads: Option<JsonbArray>,
    headers: default!(Option<Jsonb>, "NULL"),
) -> Result<i64, ErrorReport> {
    let subjects = required(subjects, "subjects")?;
    let payloads = required(payloads, "payloads")?;
    let headers = check_headers(headers)?;
    Ok(publish::batch(subjects, payloads, headers)?)
}

/// Who would receive a message published on `subject`, and through which pattern.
#[pg_extern(name = "match")]
fn match_subject(
    subject: Option<&str>,
) -> Result<TableIterator<'static, (name!(queue, String), name!(pattern, String))>, ErrorReport> {
    let subject = checked_subject(subject)?;
    Ok(TableIterator::new(subscription::matching(subject)?))
}
