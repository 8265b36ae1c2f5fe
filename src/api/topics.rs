//! Publish/subscribe with NATS subjects: subscriptions route every message published on a matching
//! subject into a queue, once per queue however many of its patterns match.
use pgrx::datum::{DatumWithOid, Interval};
use pgrx::pg_sys::{self, panic::ErrorReport};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::messages::{check_headers, check_size, Outgoing};
use super::queues::{self, SettingsChange};
use crate::access::{self, Caller, Privilege};
use crate::datum::{ArrayShape, Jsonb, JsonbArray};
use crate::error::{BusError, BusResult};
use crate::gucs;
use crate::plans::{self, Statement};
use crate::routing::{self, cache};
use crate::validate::{self, required};
use crate::wakeup;

static SUBSCRIBE: Statement = Statement {
    sql: "INSERT INTO bussig.subscription (queue_id, pattern) VALUES ($1, $2)
          ON CONFLICT (queue_id, pattern) DO NOTHING",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

static MAKE_EPHEMERAL: Statement = Statement {
    sql: "UPDATE bussig.queue SET ephemeral_ttl = $2, heartbeat_at = clock_timestamp() WHERE queue_id = $1",
    args: &[pg_sys::INT4OID, pg_sys::INTERVALOID],
    writes: true,
};

static UNSUBSCRIBE: Statement = Statement {
    sql: "DELETE FROM bussig.subscription WHERE queue_id = $1 AND pattern = $2",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

static HEARTBEAT: Statement = Statement {
    sql: "UPDATE bussig.queue SET heartbeat_at = clock_timestamp()
          WHERE name = $1 AND ephemeral_ttl IS NOT NULL",
    args: &[pg_sys::TEXTOID],
    writes: true,
};

// Claims the de-duplication key in each queue; returns the queues where it was free.
static CLAIM_DEDUP: Statement = Statement {
    sql: "INSERT INTO bussig.dedup AS d (queue_id, dedup_id, expires_at)
          SELECT q.queue_id, $2, now() + q.dedup_window FROM bussig.queue q WHERE q.queue_id = ANY ($1)
          ON CONFLICT (queue_id, dedup_id) DO UPDATE SET expires_at = excluded.expires_at
          WHERE d.expires_at <= now()
          RETURNING queue_id",
    args: &[pg_sys::INT4ARRAYOID, pg_sys::TEXTOID],
    writes: true,
};

// One queue: the payload is stored inline, as by send.
static PUBLISH_ONE: Statement = Statement {
    sql: "INSERT INTO bussig.message (queue_id, payload, headers, visible_at, priority, correlation_id, reply_to, subject)
          SELECT q.queue_id, $2, $3, clock_timestamp() + coalesce($4, interval '0'), $5, $6, $7, $8
          FROM bussig.queue q WHERE q.queue_id = ($1::int[])[1]
          RETURNING queue_id",
    args: &PUBLISH_ARGS,
    writes: true,
};

// Several queues: the payload is stored once and each queue's message refers to it.
static PUBLISH_SHARED: Statement = Statement {
    sql: "WITH body AS (INSERT INTO bussig.body (payload) VALUES ($2) RETURNING body_id)
          INSERT INTO bussig.message (queue_id, body_id, headers, visible_at, priority, correlation_id, reply_to, subject)
          SELECT q.queue_id, body.body_id, $3, clock_timestamp() + coalesce($4, interval '0'), $5, $6, $7, $8
          FROM body, bussig.queue q WHERE q.queue_id = ANY ($1)
          RETURNING queue_id",
    args: &PUBLISH_ARGS,
    writes: true,
};

// Many queues: the worker inserts the messages after commit (see bussig.fanout).
static PUBLISH_TO_WORKER: Statement = Statement {
    sql: "WITH body AS (INSERT INTO bussig.body (payload) VALUES ($2) RETURNING body_id)
          INSERT INTO bussig.fanout (queue_ids, body_id, headers, visible_at, enqueued_at, priority,
                                     correlation_id, reply_to, subject)
          SELECT $1, body.body_id, $3, clock_timestamp() + coalesce($4, interval '0'), now(), $5, $6, $7, $8 FROM body",
    args: &PUBLISH_ARGS,
    writes: true,
};

const PUBLISH_ARGS: [pg_sys::Oid; 8] = [
    pg_sys::INT4ARRAYOID,
    pg_sys::JSONBOID,
    pg_sys::JSONBOID,
    pg_sys::INTERVALOID,
    pg_sys::INT4OID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
];

fn checked_subject(subject: Option<&str>) -> BusResult<&str> {
    let subject = required(subject, "subject")?;
    routing::check_subject(subject).map_err(|why| BusError::InvalidSubject {
        subject: subject.into(),
        why,
    })?;
    Ok(subject)
}

fn checked_pattern(pattern: Option<&str>) -> BusResult<&str> {
    let pattern = required(pattern, "pattern")?;
    routing::check_pattern(pattern).map_err(|why| BusError::InvalidPattern {
        pattern: pattern.into(),
        why,
    })?;
    Ok(pattern)
}

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
    Ok(access::connect(|client, caller| -> BusResult<bool> {
        if !queues::create(client, caller, queue, SettingsChange::default(), None)? {
            caller.require(client, queue, Privilege::Manage)?;
        }
        let queue_id = queues::require(client, queue)?.queue_id;
        if let Some(ttl) = ttl {
            plans::run(client, &MAKE_EPHEMERAL, &[queue_id.into(), ttl.into()])?;
        }
        Ok(!plans::run(client, &SUBSCRIBE, &[queue_id.into(), pattern.into()])?.is_empty())
    })?)
}

#[pg_extern]
fn unsubscribe(queue: Option<&str>, pattern: Option<&str>) -> Result<bool, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let pattern = checked_pattern(pattern)?;
    Ok(access::connect(|client, caller| -> BusResult<bool> {
        caller.require(client, queue, Privilege::Manage)?;
        let queue_id = queues::require(client, queue)?.queue_id;
        Ok(!plans::run(client, &UNSUBSCRIBE, &[queue_id.into(), pattern.into()])?.is_empty())
    })?)
}

/// True when the queue is ephemeral and now lives another ttl; false for a queue that is not.
#[pg_extern]
fn heartbeat(queue: Option<&str>) -> Result<bool, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    Ok(access::connect(|client, caller| -> BusResult<bool> {
        caller.require(client, queue, Privilege::Consume)?;
        if !plans::run(client, &HEARTBEAT, &[queue.into()])?.is_empty() {
            return Ok(true);
        }
        queues::require(client, queue)?;
        Ok(false)
    })?)
}

/// One message for every subscribed queue whose pattern matches and that the caller may send to; how
/// many queues received it.
#[allow(clippy::too_many_arguments)]
fn route(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    subject: &str,
    payload: Jsonb,
    headers: Option<Jsonb>,
    delay: Option<Interval>,
    priority: i32,
    dedup_id: Option<&str>,
    correlation_id: Option<&str>,
    reply_to: Option<&str>,
) -> BusResult<i64> {
    let routes = cache::routes(client)?;
    let matching = routes.index.matching_values(subject);
    let mut queue_ids = caller.permitted(client, matching, Some(Privilege::Send))?;
    if let (Some(dedup_id), false) = (dedup_id, queue_ids.is_empty()) {
        queue_ids = plans::first_column(
            client,
            &CLAIM_DEDUP,
            &[queue_ids.clone().into(), dedup_id.into()],
        )?;
        queue_ids.sort_unstable();
    }
    if queue_ids.is_empty() {
        return Ok(0);
    }
    let count = queue_ids.len();
    let args: [DatumWithOid; 8] = [
        queue_ids.into(),
        payload.into(),
        headers.into(),
        delay.into(),
        priority.into(),
        correlation_id.into(),
        reply_to.into(),
        subject.into(),
    ];
    if count > gucs::INLINE_FANOUT_LIMIT.get() as usize && crate::worker::serves_this_database() {
        plans::run(client, &PUBLISH_TO_WORKER, &args)?;
        wakeup::note_fanout();
        return Ok(count as i64);
    }
    let statement = if count == 1 {
        &PUBLISH_ONE
    } else {
        &PUBLISH_SHARED
    };
    let ready_now = delay.is_none_or(|delay| validate::is_zero(&delay));
    let mut delivered = 0;
    for row in plans::run(client, statement, &args)? {
        let queue_id: i32 = row.get(1)?.expect("NOT NULL");
        crate::depth::added(queue_id, 1);
        if let Some((name, notify)) = routes.queues.get(&queue_id) {
            wakeup::announce(queue_id, name, *notify, ready_now, 1);
        }
        delivered += 1;
    }
    Ok(delivered)
}

#[allow(clippy::too_many_arguments)]
#[pg_extern]
fn publish(
    subject: Option<&str>,
    payload: Option<Jsonb>,
    headers: default!(Option<Jsonb>, "NULL"),
    delay: default!(Option<Interval>, "NULL"),
    priority: default!(Option<i32>, 0),
    dedup_id: default!(Option<&str>, "NULL"),
    correlation_id: default!(Option<&str>, "NULL"),
    reply_to: default!(Option<&str>, "NULL"),
) -> Result<i32, ErrorReport> {
    let subject = checked_subject(subject)?;
    let Outgoing {
        payload,
        headers,
        delay,
        priority,
    } = Outgoing::check(payload, headers, delay, priority)?;
    let count = access::connect(|client, caller| {
        route(
            client,
            caller,
            subject,
            payload,
            headers,
            delay,
            priority,
            dedup_id,
            correlation_id,
            reply_to,
        )
    })?;
    Ok(count as i32)
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
    let (count, any_null) = payloads.shape();
    if any_null {
        return Err(BusError::NullArgument("every element of payloads").into());
    }
    if count != subjects.len() {
        return Err(BusError::invalid(
            "payloads",
            format!("{count} payloads do not match {} subjects", subjects.len()),
        )
        .into());
    }
    let payloads = payloads.elements();
    let mut subject_list = Vec::with_capacity(count);
    for (subject, payload) in subjects.iter().zip(&payloads) {
        subject_list.push(checked_subject(subject.as_deref())?);
        check_size(payload.size(), headers)?;
    }
    Ok(access::connect(|client, caller| -> BusResult<i64> {
        let mut total = 0;
        for (subject, payload) in subject_list.into_iter().zip(payloads) {
            total += route(
                client, caller, subject, payload, headers, None, 0, None, None, None,
            )?;
        }
        Ok(total)
    })?)
}

/// Who would receive a message published on `subject`, and through which pattern.
#[pg_extern(name = "match")]
fn match_subject(
    subject: Option<&str>,
) -> Result<TableIterator<'static, (name!(queue, String), name!(pattern, String))>, ErrorReport> {
    let subject = checked_subject(subject)?;
    let rows = access::connect(|client, caller| -> BusResult<Vec<(String, String)>> {
        let routes = cache::routes(client)?;
        let matches = routes.index.matches(subject);
        let ids = matches.iter().map(|&(_, queue_id)| queue_id).collect();
        let visible = caller.permitted(client, ids, None)?;
        let mut rows: Vec<(String, String)> = matches
            .into_iter()
            .filter(|(_, queue_id)| visible.contains(queue_id))
            .filter_map(|(pattern, queue_id)| {
                routes
                    .queues
                    .get(&queue_id)
                    .map(|(name, _)| (name.clone(), pattern.to_string()))
            })
            .collect();
        rows.sort();
        Ok(rows)
    })?;
    Ok(TableIterator::new(rows))
}
