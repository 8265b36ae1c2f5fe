//! append, append_batch, and the appends `publish` makes to subscribed streams. A record goes into
//! the stream's current segment without a seq (see `sequence`); the commit wakes the stream's
//! waiting readers.
use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use super::body::{self, Body};
use super::{partition_of_key, partition_unkeyed, require, Stream, StreamPrivilege};
use crate::access::Caller;
use crate::error::{BusError, BusResult};
use crate::message::send::check_size;
use crate::pg::datum::{ArrayShape, Jsonb, JsonbArray};
use crate::pg::wakeup;
use crate::plans;
use crate::validate::{self, required};

/// One record to append.
pub struct Record<'a> {
    pub payload: Jsonb,
    pub subject: Option<&'a str>,
    pub headers: Option<Jsonb>,
    pub key: Option<&'a str>,
}

// The current segment is read in the statement itself: the stream may come from a backend's cache.
// A record refers to a shared body ($7, $8) instead of holding its payload, or holds it ($5).
fn insert_one(stream: &Stream) -> String {
    format!(
        "INSERT INTO {} (segment, partition, key, subject, payload, headers, body_segment, body_id)
         VALUES ((SELECT current_segment FROM bussig.stream WHERE stream_id = $1), $2, $3, $4, $5, $6, $7, $8)",
        stream.table()
    )
}

// unnest keeps the arrays' order, and record ids are taken in it: a batch's records of one key are
// numbered in the order given. With neither keys nor subjects, the whole batch goes to partition $2.
fn insert_batch(stream: &Stream, plain: bool) -> String {
    let rows = if plain {
        "SELECT $2[1], NULL::text, NULL::text, b.payload FROM unnest($5::jsonb[]) AS b(payload)"
    } else {
        "SELECT * FROM unnest($2::int[], $3::text[], $4::text[], $5::jsonb[])"
    };
    format!(
        "INSERT INTO {} (segment, partition, key, subject, payload, headers)
         SELECT (SELECT current_segment FROM bussig.stream WHERE stream_id = $1), b.partition, b.key,
                b.subject, b.payload, $6
         FROM ({rows}) AS b(partition, key, subject, payload)",
        stream.table()
    )
}

/// The partition a record goes to.
fn partition(stream: &Stream, key: Option<&str>) -> i32 {
    match key {
        Some(key) => partition_of_key(key, stream.partitions),
        None => partition_unkeyed(stream.partitions),
    }
}

/// Wakes the stream's waiting readers when this transaction commits: all of them, since every group
/// reads every record.
fn announce(stream: &Stream) {
    super::sequence::forget(stream.stream_id);
    wakeup::note_readable(super::wake_key(stream.stream_id), u32::MAX);
}

/// A key or subject as given: NULL is none; an empty or oversized one is refused.
pub fn checked_key(key: Option<&str>) -> BusResult<Option<&str>> {
    match key {
        Some("") => Err(BusError::invalid("key", "it is empty")),
        Some(key) if key.len() > validate::MAX_GROUP_ID_LEN => Err(BusError::invalid(
            "key",
            format!("it is longer than {} bytes", validate::MAX_GROUP_ID_LEN),
        )),
        key => Ok(key),
    }
}

pub fn checked_subject(subject: Option<&str>) -> BusResult<Option<&str>> {
    match subject {
        None => Ok(None),
        Some(subject) => crate::topic::checked_subject(Some(subject)).map(Some),
    }
}

/// Appends one record to a stream the caller may append to: the partition it went to.
pub fn one(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    record: Record<'_>,
) -> BusResult<i32> {
    let stream = require(client, caller, name, StreamPrivilege::Append)?;
    append_to(client, &stream, record, None)
}

/// Appends `record`, whose payload is stored in `body` when given.
fn append_to(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    record: Record<'_>,
    body: Option<Body>,
) -> BusResult<i32> {
    let partition = partition(stream, record.key);
    let args = [
        stream.stream_id.into(),
        partition.into(),
        record.key.into(),
        record.subject.into(),
        body.is_none().then_some(record.payload).into(),
        record.headers.into(),
        body.map(|body| body.segment).into(),
        body.map(|body| body.body_id).into(),
    ];
    let types = [
        pg_sys::INT4OID,
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::JSONBOID,
        pg_sys::JSONBOID,
        pg_sys::INT4OID,
        pg_sys::INT8OID,
    ];
    crate::pg::arrivals::appending(super::wake_key(stream.stream_id));
    plans::run_text(client, &insert_one(stream), &types, true, &args)?;
    announce(stream);
    Ok(partition)
}

/// The checked arguments of append_batch.
pub struct Batch {
    pub payloads: JsonbArray,
    pub count: usize,
    pub subjects: Option<Vec<Option<String>>>,
    pub headers: Option<Jsonb>,
    pub keys: Option<Vec<Option<String>>>,
}

impl Batch {
    pub fn check(
        payloads: JsonbArray,
        subjects: Option<Vec<Option<String>>>,
        headers: Option<Jsonb>,
        keys: Option<Vec<Option<String>>>,
    ) -> BusResult<Batch> {
        let (count, any_null) = payloads.shape();
        if any_null {
            return Err(BusError::NullArgument("every element of payloads"));
        }
        if count as i32 > validate::MAX_BATCH * 10 {
            return Err(BusError::invalid(
                "payloads",
                format!(
                    "{count} records are more than {} a batch",
                    validate::MAX_BATCH * 10
                ),
            ));
        }
        let headers = crate::message::send::check_headers(headers)?;
        let array = payloads;
        for payload in &array.elements() {
            check_size(payload.size(), headers)?;
        }
        for (what, values) in [("subjects", &subjects), ("keys", &keys)] {
            let Some(values) = values else { continue };
            if values.len() != count {
                return Err(BusError::invalid(
                    what,
                    format!("{} {what} do not match {count} payloads", values.len()),
                ));
            }
        }
        if let Some(subjects) = &subjects {
            for subject in subjects {
                checked_subject(subject.as_deref())?;
            }
        }
        if let Some(keys) = &keys {
            for key in keys {
                checked_key(key.as_deref())?;
            }
        }
        Ok(Batch {
            payloads: array,
            count,
            subjects,
            headers,
            keys,
        })
    }
}

/// Appends a batch to a stream the caller may append to: how many records.
pub fn batch(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    batch: Batch,
) -> BusResult<i64> {
    let stream = require(client, caller, name, StreamPrivilege::Append)?;
    let count = batch.count;
    if count == 0 {
        return Ok(0);
    }
    let plain = batch.keys.is_none() && batch.subjects.is_none();
    let partitions: Vec<i32> = match &batch.keys {
        Some(keys) => keys
            .iter()
            .map(|key| partition(&stream, key.as_deref()))
            .collect(),
        // Records without a key are spread by batch: one partition takes a whole batch, so that its
        // index entries go to one place.
        None => vec![partition(&stream, None); if plain { 1 } else { count }],
    };
    let (keys, subjects) = if plain {
        (None, None)
    } else {
        (
            Some(batch.keys.unwrap_or_else(|| vec![None; count])),
            Some(batch.subjects.unwrap_or_else(|| vec![None; count])),
        )
    };
    let types = [
        pg_sys::INT4OID,
        pg_sys::INT4ARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::JSONBARRAYOID,
        pg_sys::JSONBOID,
    ];
    let args = [
        stream.stream_id.into(),
        partitions.into(),
        keys.into(),
        subjects.into(),
        batch.payloads.into(),
        batch.headers.into(),
    ];
    crate::pg::arrivals::appending(super::wake_key(stream.stream_id));
    plans::run_text(client, &insert_batch(&stream, plain), &types, true, &args)?;
    announce(&stream);
    Ok(count as i64)
}

/// `publish`: appends the message to every stream with a pattern matching `subject` that the caller
/// may append to, once each, storing the payload once when there are several; how many streams.
pub fn published(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    subject: &str,
    payload: Jsonb,
    headers: Option<Jsonb>,
) -> BusResult<i64> {
    let routes = crate::topic::routes::routes(client)?;
    let streams: Vec<String> = routes
        .streams
        .matching_values(subject)
        .into_iter()
        .map(|place| routes.stream_names[place].clone())
        .collect();
    let mut targets = Vec::with_capacity(streams.len());
    for name in streams {
        match require(client, caller, &name, StreamPrivilege::Append) {
            Ok(stream) => targets.push(stream),
            Err(BusError::StreamPermissionDenied { .. } | BusError::UnknownStream(_)) => continue,
            Err(other) => return Err(other),
        }
    }
    let body = match targets.len() {
        0 | 1 => None,
        _ => Some(body::store(client, payload)?),
    };
    for stream in &targets {
        let record = Record {
            payload,
            subject: Some(subject),
            headers,
            key: None,
        };
        append_to(client, stream, record, body)?;
    }
    Ok(targets.len() as i64)
}

/// Checks a payload and headers as append takes them.
pub fn checked_record<'a>(
    payload: Option<Jsonb>,
    subject: Option<&'a str>,
    headers: Option<Jsonb>,
    key: Option<&'a str>,
) -> BusResult<Record<'a>> {
    let payload = required(payload, "payload")?;
    let headers = crate::message::send::check_headers(headers)?;
    check_size(payload.size(), headers)?;
    Ok(Record {
        payload,
        subject: checked_subject(subject)?,
        headers,
        key: checked_key(key)?,
    })
}
