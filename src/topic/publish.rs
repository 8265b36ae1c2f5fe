//! publish and publish_batch: one message into every queue whose subscription matches the subject,
//! the payload stored once when several queues get it, handed to the worker past a fan-out limit.
use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use super::{checked_subject, routes};
use crate::access::{self, Caller, Privilege};
use crate::error::{BusError, BusResult};
use crate::message::group;
use crate::message::send::{check_size, Extras, Outgoing, MESSAGE_FIELDS};
use crate::pg::datum::{ArrayShape, Jsonb, JsonbArray};
use crate::pg::gucs;
use crate::pg::wakeup;
use crate::plans::{self, Statement};
use crate::validate;

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
    sql: "INSERT INTO bussig.message (queue_id, payload, headers, visible_at, priority, correlation_id, reply_to, subject,
                                     group_id)
          SELECT q.queue_id, $2, $3, clock_timestamp() + coalesce($4, interval '0'), $5, $6, $7, $8, $9
          FROM bussig.queue q WHERE q.queue_id = ($1::int[])[1]
          RETURNING queue_id, message_id",
    args: &PUBLISH_GROUPED_ARGS,
    writes: true,
};

// Several queues: the payload is stored once and each queue's message refers to it.
static PUBLISH_SHARED: Statement = Statement {
    sql: "WITH body AS (INSERT INTO bussig.body (payload) VALUES ($2) RETURNING body_id)
          INSERT INTO bussig.message (queue_id, body_id, headers, visible_at, priority, correlation_id, reply_to, subject,
                                      group_id)
          SELECT q.queue_id, body.body_id, $3, clock_timestamp() + coalesce($4, interval '0'), $5, $6, $7, $8, $9
          FROM body, bussig.queue q WHERE q.queue_id = ANY ($1)
          RETURNING queue_id, message_id",
    args: &PUBLISH_GROUPED_ARGS,
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

/// The queue ids, the message's fields, its subject.
const PUBLISH_ARGS: [pg_sys::Oid; 8] = plans::joined(
    plans::joined::<1, 6, 7>([pg_sys::INT4ARRAYOID], MESSAGE_FIELDS),
    [pg_sys::TEXTOID],
);
/// The same, then its group.
const PUBLISH_GROUPED_ARGS: [pg_sys::Oid; 9] = plans::joined(PUBLISH_ARGS, [pg_sys::TEXTOID]);

/// One message for every subscribed queue whose pattern matches and that the caller may send to; how
/// many queues received it.
fn route(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    subject: &str,
    outgoing: Outgoing,
    extras: &Extras<'_>,
) -> BusResult<i64> {
    let (dedup_id, group_id) = (extras.dedup_id, extras.group_id);
    let routes = routes::routes(client)?;
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
    let mut args = outgoing.args(queue_ids.into(), extras);
    args.push(subject.into());
    // A grouped message joins its group in each queue in this transaction: never handed to the worker.
    if group_id.is_none()
        && count > gucs::INLINE_FANOUT_LIMIT.get() as usize
        && crate::worker::serves_this_database()
    {
        plans::run(client, &PUBLISH_TO_WORKER, &args)?;
        wakeup::note_fanout();
        return Ok(count as i64);
    }
    let statement = if count == 1 {
        &PUBLISH_ONE
    } else {
        &PUBLISH_SHARED
    };
    args.push(group_id.into());
    let ready_now = outgoing.delay.is_none_or(|delay| validate::is_zero(&delay));
    let mut delivered = 0;
    let mut message_ids = Vec::new();
    for row in plans::run(client, statement, &args)? {
        let queue_id: i32 = plans::filled(&row, 1, "queue id")?;
        crate::depth::added(queue_id, 1);
        if group_id.is_some() {
            message_ids.push(plans::filled::<i64>(&row, 2, "message id")?);
        } else if let Some((name, notify)) = routes.queues.get(&queue_id) {
            wakeup::announce(queue_id, name, *notify, ready_now, 1);
        }
        delivered += 1;
    }
    // Grouped messages are announced as they join their groups: only a group's head is ready.
    group::join(client, message_ids)?;
    Ok(delivered)
}

/// Publishes one message on `subject`: to how many queues and streams.
pub fn one(subject: &str, outgoing: Outgoing, extras: Extras<'_>) -> BusResult<i64> {
    access::connect(|client, caller| {
        let (payload, headers) = (outgoing.payload, outgoing.headers);
        let queues = route(client, caller, subject, outgoing, &extras)?;
        Ok(queues + crate::stream::append::published(client, caller, subject, payload, headers)?)
    })
}

/// Publishes each payload on its subject, with the same headers: to how many queues in all.
pub fn batch(
    subjects: Vec<Option<String>>,
    payloads: JsonbArray,
    headers: Option<Jsonb>,
) -> BusResult<i64> {
    let (count, any_null) = payloads.shape();
    if any_null {
        return Err(BusError::NullArgument("every element of payloads"));
    }
    if count != subjects.len() {
        return Err(BusError::invalid(
            "payloads",
            format!("{count} payloads do not match {} subjects", subjects.len()),
        ));
    }
    let payloads = payloads.elements();
    let mut subject_list = Vec::with_capacity(count);
    for (subject, payload) in subjects.iter().zip(&payloads) {
        subject_list.push(checked_subject(subject.as_deref())?);
        check_size(payload.size(), headers)?;
    }
    let none = Extras {
        dedup_id: None,
        correlation_id: None,
        reply_to: None,
        group_id: None,
    };
    access::connect(|client, caller| -> BusResult<i64> {
        let mut total = 0;
        for (subject, payload) in subject_list.into_iter().zip(payloads) {
            let outgoing = Outgoing {
                payload,
                headers,
                delay: None,
                priority: 0,
            };
            total += route(client, caller, subject, outgoing, &none)?;
            total += crate::stream::append::published(client, caller, subject, payload, headers)?;
        }
        Ok(total)
    })
}
