//! send and send_batch: new messages into a queue, in the caller's transaction. A send to a queue this
//! backend knows is written straight into the table (`direct_insert`) without a statement.
use pgrx::datum::{DatumWithOid, Interval};
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use pgrx::IntoDatum;

use super::group;
use crate::access::{self, Caller, Privilege};
use crate::depth;
use crate::error::{BusError, BusResult};
use crate::pg::datum::{ArrayShape, Jsonb, JsonbArray};
use crate::pg::direct_insert;
use crate::pg::gucs;
use crate::pg::wakeup;
use crate::plans::{self, Statement};
use crate::queue::{self, SettingsChange};
use crate::validate::{self, required};

// The queue comes as its id, from the backend's cache of queues (queue::destination): a send is one
// plain INSERT. A send that races a drop of its queue commits a message the worker then removes.
static SEND: Statement = Statement {
    sql: "INSERT INTO bussig.message (queue_id, payload, headers, visible_at, priority, correlation_id, reply_to, group_id)
          VALUES ($1, $2, $3, clock_timestamp() + coalesce($4, interval '0'), $5, $6, $7, $8)
          RETURNING message_id",
    args: &SEND_ARGS,
    writes: true,
};

/// The parameter types of a message's fields, as sends and publishes take them after its
/// destination: payload, headers, delay, priority, correlation_id, reply_to.
pub const MESSAGE_FIELDS: [pg_sys::Oid; 6] = [
    pg_sys::JSONBOID,
    pg_sys::JSONBOID,
    pg_sys::INTERVALOID,
    pg_sys::INT4OID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
];

/// queue_id, the message's fields, its group.
const SEND_ARGS: [pg_sys::Oid; 8] = plans::joined(
    plans::joined::<1, 6, 7>([pg_sys::INT4OID], MESSAGE_FIELDS),
    [pg_sys::TEXTOID],
);

// A key that expired stays in place until the worker prunes it; ON CONFLICT revives it.
static SEND_DEDUPLICATED: Statement = Statement {
    sql: "WITH q AS (SELECT queue_id, dedup_window FROM bussig.queue WHERE queue_id = $1),
          fresh AS (
              INSERT INTO bussig.dedup AS d (queue_id, dedup_id, expires_at)
              SELECT queue_id, $9, now() + dedup_window FROM q
              ON CONFLICT (queue_id, dedup_id) DO UPDATE SET expires_at = excluded.expires_at
              WHERE d.expires_at <= now()
              RETURNING queue_id
          ),
          sent AS (
              INSERT INTO bussig.message (queue_id, payload, headers, visible_at, priority, correlation_id, reply_to, group_id)
              SELECT fresh.queue_id, $2, $3, clock_timestamp() + coalesce($4, interval '0'), $5, $6, $7, $8 FROM fresh
              RETURNING message_id
          )
          SELECT message_id FROM sent",
    args: &plans::joined::<8, 1, 9>(SEND_ARGS, [pg_sys::TEXTOID]),
    writes: true,
};

// The function scan hands the insert the payloads in array order, so ids follow that order.
static SEND_BATCH: Statement = Statement {
    sql: "INSERT INTO bussig.message (queue_id, payload, headers, visible_at, priority, group_id)
          SELECT $1, p.payload, $3, clock_timestamp() + coalesce($4, interval '0'), $5, p.group_id
          FROM unnest($2::jsonb[], $6::text[]) AS p(payload, group_id)
          RETURNING message_id",
    args: &[
        pg_sys::INT4OID,
        pg_sys::JSONBARRAYOID,
        pg_sys::JSONBOID,
        pg_sys::INTERVALOID,
        pg_sys::INT4OID,
        pg_sys::TEXTARRAYOID,
    ],
    writes: true,
};

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

    /// The arguments of a statement that writes this message: its destination, then its fields as
    /// `MESSAGE_FIELDS` types them.
    pub fn args<'a>(
        &self,
        destination: DatumWithOid<'a>,
        extras: &Extras<'a>,
    ) -> Vec<DatumWithOid<'a>> {
        vec![
            destination,
            self.payload.into(),
            self.headers.into(),
            self.delay.into(),
            self.priority.into(),
            extras.correlation_id.into(),
            extras.reply_to.into(),
        ]
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
) -> BusResult<queue::Queue> {
    match caller.require(client, queue, Privilege::Send) {
        Err(BusError::UnknownQueue(_)) => {}
        checked => checked?,
    }
    if let Some(found) = queue::find(client, queue)? {
        return Ok(found);
    }
    if !gucs::AUTO_CREATE_QUEUES.get() {
        return Err(BusError::UnknownQueue(queue.to_string()));
    }
    queue::create(client, caller, queue, SettingsChange::default(), None)?;
    queue::require(client, queue)
}

/// Runs a send into `found`: written directly when `direct` describes the messages and the table
/// allows it, else by `statement` with `args`. Returns the new message ids (none for a duplicate).
/// `grouped` messages join their groups. Waiting readers are woken, and the queue's NOTIFY sent, at
/// commit.
#[allow(clippy::too_many_arguments)]
fn insert_messages(
    client: &mut SpiClient<'_>,
    queue: &str,
    found: queue::Queue,
    delay: Option<Interval>,
    grouped: bool,
    direct: Option<&direct_insert::Messages>,
    statement: &'static Statement,
    args: &[DatumWithOid<'_>],
) -> BusResult<Vec<i64>> {
    let ids = match direct.and_then(direct_insert::insert) {
        Some(ids) => ids,
        None => plans::first_column(client, statement, args)?,
    };
    if grouped {
        // Announced as they join their groups: only a group's head is ready. Those of the batch in
        // no group (a NULL group id) are ready as any send's.
        depth::added(found.queue_id, ids.len());
        let joined = group::join(client, ids.clone())?;
        wake(queue, found, delay, ids.len() - joined);
    } else {
        announce(queue, found, delay, &ids);
    }
    Ok(ids)
}

/// A send with no statement to run (see `access::connect_unless_direct`): a queue this backend has
/// cached, and messages the table takes directly. None, with nothing written, otherwise.
fn send_directly<'a>(
    queue: &str,
    delay: Option<Interval>,
    messages: impl FnOnce(i32) -> direct_insert::Messages<'a>,
) -> Option<Vec<i64>> {
    let found = queue::cached(queue)?;
    let ids = direct_insert::insert(&messages(found.queue_id))?;
    announce(queue, found, delay, &ids);
    Some(ids)
}

/// The messages are counted, and waiting readers woken and the queue's NOTIFY sent at commit.
fn announce(queue: &str, found: queue::Queue, delay: Option<Interval>, ids: &[i64]) {
    depth::added(found.queue_id, ids.len());
    wake(queue, found, delay, ids.len());
}

/// `count` new messages wake waiting readers, and send the queue's NOTIFY, at commit.
fn wake(queue: &str, found: queue::Queue, delay: Option<Interval>, count: usize) {
    if count > 0 {
        let ready_now = delay.is_none_or(|delay| validate::is_zero(&delay));
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        wakeup::announce(found.queue_id, queue, found.notify, ready_now, count);
    }
}

/// What a single send carries besides the message itself.
pub struct Extras<'a> {
    pub dedup_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    /// Checked with `validate::group_id`.
    pub group_id: Option<&'a str>,
}

/// Sends one message: its id, or None when `dedup_id` made it a duplicate.
pub fn one(queue: &str, outgoing: Outgoing, extras: Extras<'_>) -> BusResult<Option<i64>> {
    let (delay, dedup_id, group_id) = (outgoing.delay, extras.dedup_id, extras.group_id);
    let payloads = [outgoing.payload.into_datum().expect("a payload is a datum")];
    let messages = |queue_id| direct_insert::Messages {
        queue_id,
        payloads: &payloads,
        headers: outgoing.headers.and_then(IntoDatum::into_datum),
        delay,
        priority: outgoing.priority,
        correlation_id: extras.correlation_id,
        reply_to: extras.reply_to,
    };
    let direct = || {
        (dedup_id.is_none() && group_id.is_none())
            .then(|| send_directly(queue, delay, messages))
            .flatten()
    };
    let ids = access::connect_unless_direct((queue, Privilege::Send), direct, |client, caller| {
        let found = destination(client, caller, queue)?;
        let messages = messages(found.queue_id);
        let mut args = outgoing.args(found.queue_id.into(), &extras);
        args.push(group_id.into());
        let (statement, direct) = match (dedup_id, group_id) {
            (Some(dedup_id), _) => {
                args.push(dedup_id.into());
                (&SEND_DEDUPLICATED, None)
            }
            (None, Some(_)) => (&SEND, None),
            (None, None) => (&SEND, Some(&messages)),
        };
        let grouped = group_id.is_some();
        let ids = insert_messages(
            client, queue, found, delay, grouped, direct, statement, &args,
        )?;
        Ok(ids)
    })?;
    Ok(ids.first().copied())
}

/// Sends a reply into `queue`, which must exist (replies do not create queues): its id. Runs in the
/// caller's open connection, beside the ack of the request.
pub(super) fn reply_into(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    queue: &str,
    payload: Jsonb,
    headers: Option<Jsonb>,
    correlation_id: &str,
) -> BusResult<i64> {
    caller.require(client, queue, Privilege::Send)?;
    let found = queue::require(client, queue)?;
    let args: [DatumWithOid; 8] = [
        found.queue_id.into(),
        payload.into(),
        headers.into(),
        Option::<Interval>::None.into(),
        0.into(),
        correlation_id.into(),
        Option::<&str>::None.into(),
        Option::<&str>::None.into(),
    ];
    let ids = insert_messages(client, queue, found, None, false, None, &SEND, &args)?;
    ids.first()
        .copied()
        .ok_or_else(|| BusError::Corrupt("a reply's INSERT returned no id".into()))
}

/// Sends `payloads` in array order, each with the group of the same place in `group_ids`: their ids,
/// ascending.
pub fn batch(
    queue: &str,
    payloads: JsonbArray,
    headers: Option<Jsonb>,
    delay: Option<Interval>,
    priority: i32,
    group_ids: Option<Vec<Option<String>>>,
) -> BusResult<Vec<i64>> {
    let (count, any_null) = payloads.shape();
    if any_null {
        return Err(BusError::NullArgument("every element of payloads"));
    }
    let grouped = match &group_ids {
        Some(group_ids) if group_ids.len() != count => {
            return Err(BusError::invalid(
                "group_ids",
                format!(
                    "{} group ids do not match {count} payloads",
                    group_ids.len()
                ),
            ))
        }
        Some(group_ids) => {
            for group_id in group_ids {
                validate::group_id(group_id.as_deref())?;
            }
            group_ids.iter().any(Option::is_some)
        }
        None => false,
    };
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
    let direct = || {
        (!grouped)
            .then(|| send_directly(queue, delay, messages))
            .flatten()
    };
    let mut ids =
        access::connect_unless_direct((queue, Privilege::Send), direct, |client, caller| {
            let found = destination(client, caller, queue)?;
            let args: [DatumWithOid; 6] = [
                found.queue_id.into(),
                payloads.into(),
                headers.into(),
                delay.into(),
                priority.into(),
                group_ids.into(),
            ];
            let messages = messages(found.queue_id);
            let direct = (!grouped).then_some(&messages);
            insert_messages(
                client,
                queue,
                found,
                delay,
                grouped,
                direct,
                &SEND_BATCH,
                &args,
            )
        })?;
    ids.sort_unstable();
    Ok(ids)
}
