//! Streams: create_stream, alter_stream, drop_stream, append, append_batch, consumer groups,
//! stream_read, stream_commit, stream_seek, stream_seek_time, stream_range, subscribe_stream and
//! unsubscribe_stream; their arguments checked, the work done in `stream`.
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::Uuid;

use crate::access;
use crate::pg::datum::{Jsonb, JsonbArray};
use crate::stream::append::{self, Batch};
use crate::stream::definition::{self, Retention};
use crate::stream::group::{self, StartAt};
use crate::stream::lease::{self, GroupPartition, HeldLease};
use crate::stream::read::{self, GroupPosition, StreamReadRequest, StreamRecord};
use crate::stream::{self, group_name, stream_name};
use crate::topic::checked_pattern;
use crate::validate::required;

#[pg_extern]
fn create_stream(
    stream: Option<&str>,
    partitions: default!(Option<i32>, 1),
    retention: default!(Option<Interval>, "'7 days'"),
    retention_bytes: default!(Option<i64>, "NULL"),
) -> Result<bool, ErrorReport> {
    let stream = stream_name(stream)?;
    let partitions = required(partitions, "partitions")?;
    let retention = Retention::check(Some(required(retention, "retention")?), retention_bytes)?;
    Ok(access::connect(|client, caller| {
        definition::create(client, caller, stream, partitions, retention)
    })?)
}

/// Changes what is kept: NULL leaves a setting as it is; retention_bytes => 0 removes the size limit.
#[pg_extern]
fn alter_stream(
    stream: Option<&str>,
    retention: default!(Option<Interval>, "NULL"),
    retention_bytes: default!(Option<i64>, "NULL"),
) -> Result<(), ErrorReport> {
    let stream = stream_name(stream)?;
    let no_size_limit = retention_bytes == Some(0);
    let retention_bytes = retention_bytes.filter(|bytes| *bytes != 0);
    let retention = Retention::check(retention, retention_bytes)?;
    Ok(access::connect(|client, caller| {
        definition::alter(client, caller, stream, retention, no_size_limit)
    })?)
}

#[pg_extern]
fn drop_stream(stream: Option<&str>) -> Result<bool, ErrorReport> {
    let stream = stream_name(stream)?;
    Ok(access::connect(|client, caller| {
        definition::drop(client, caller, stream)
    })?)
}

/// Appends one record: returns the partition it went to. Its seq is given when it becomes readable
/// (after the commit), so no append can return it.
#[pg_extern]
fn append(
    stream: Option<&str>,
    payload: Option<Jsonb>,
    subject: default!(Option<&str>, "NULL"),
    headers: default!(Option<Jsonb>, "NULL"),
    key: default!(Option<&str>, "NULL"),
) -> Result<i64, ErrorReport> {
    let stream = stream_name(stream)?;
    let record = append::checked_record(payload, subject, headers, key)?;
    Ok(access::connect(|client, caller| {
        append::one(client, caller, stream, record).map(i64::from)
    })?)
}

/// Appends a batch: how many records.
#[pg_extern]
fn append_batch(
    stream: Option<&str>,
    payloads: Option<JsonbArray>,
    subjects: default!(Option<Vec<Option<String>>>, "NULL"),
    headers: default!(Option<Jsonb>, "NULL"),
    keys: default!(Option<Vec<Option<String>>>, "NULL"),
) -> Result<i64, ErrorReport> {
    let stream = stream_name(stream)?;
    let batch = Batch::check(required(payloads, "payloads")?, subjects, headers, keys)?;
    Ok(access::connect(|client, caller| {
        append::batch(client, caller, stream, batch)
    })?)
}

#[pg_extern]
fn create_consumer_group(
    stream: Option<&str>,
    consumer_group: Option<&str>,
    start_at: default!(Option<&str>, "'latest'"),
) -> Result<bool, ErrorReport> {
    let stream = stream_name(stream)?;
    let consumer_group = group_name(consumer_group)?;
    let start_at = StartAt::parse(required(start_at, "start_at")?)?;
    Ok(access::connect(|client, caller| {
        group::create(client, caller, stream, consumer_group, start_at)
    })?)
}

#[pg_extern]
fn drop_consumer_group(
    stream: Option<&str>,
    consumer_group: Option<&str>,
) -> Result<bool, ErrorReport> {
    let stream = stream_name(stream)?;
    let consumer_group = group_name(consumer_group)?;
    Ok(access::connect(|client, caller| {
        group::drop(client, caller, stream, consumer_group)
    })?)
}

type RecordRow = (
    i32,
    i64,
    Option<Uuid>,
    Option<String>,
    Option<String>,
    Jsonb,
    Option<Jsonb>,
    TimestampWithTimeZone,
);

fn rows(records: Vec<StreamRecord>) -> impl Iterator<Item = RecordRow> {
    records.into_iter().map(|r| {
        (
            r.partition,
            r.seq,
            r.lease_token,
            r.subject,
            r.key,
            r.payload,
            r.headers,
            r.appended_at,
        )
    })
}

/// A `#[pg_extern]` returning records, as stream_read and stream_range do: partition and seq, the
/// columns given (stream_read's lease token), then the record's own (see `returns_table!`).
macro_rules! returns_records {
    ($(#[$($attr:tt)*])* fn $name:ident($($params:tt)*) -> ($($middle:tt)*) $body:tt) => {
        super::returns_table! {
            $(#[$($attr)*])*
            fn $name($($params)*) -> (
                name!(partition, i32),
                name!(seq, i64),
                $($middle)*
                name!(subject, Option<String>),
                name!(key, Option<String>),
                name!(payload, Jsonb),
                name!(headers, Option<Jsonb>),
                name!(appended_at, TimestampWithTimeZone),
            ) $body
        }
    };
}

returns_records! {
    fn stream_read(
        stream: Option<&str>,
        consumer_group: Option<&str>,
        max_records: default!(Option<i32>, 100),
        wait: default!(Option<Interval>, "NULL"),
        lease: default!(Option<Interval>, "'30 seconds'"),
    ) -> (name!(lease_token, Option<Uuid>),) {
        let stream = stream_name(stream)?;
        let consumer_group = group_name(consumer_group)?;
        let request = StreamReadRequest::check(max_records, wait, lease)?;
        let records = read::read_waiting(stream, consumer_group, request)?;
        Ok(TableIterator::new(rows(records)))
    }
}

#[pg_extern]
fn stream_commit(
    stream: Option<&str>,
    consumer_group: Option<&str>,
    partition: Option<i32>,
    seq: Option<i64>,
    lease_token: Option<Uuid>,
) -> Result<bool, ErrorReport> {
    let place = GroupPartition::check(stream, consumer_group, partition)?;
    let position = GroupPosition::check(place, seq)?;
    let lease_token = required(lease_token, "lease_token")?;
    Ok(access::connect(|client, caller| {
        read::commit(client, caller, &position, lease_token)
    })?)
}

/// The lease of the partition runs `lease` from now: false when another member took it since.
#[pg_extern]
fn stream_extend_lease(
    stream: Option<&str>,
    consumer_group: Option<&str>,
    partition: Option<i32>,
    lease_token: Option<Uuid>,
    lease: default!(Option<Interval>, "'30 seconds'"),
) -> Result<bool, ErrorReport> {
    let place = GroupPartition::check(stream, consumer_group, partition)?;
    let held = HeldLease::check(place, lease_token)?;
    let lease = StreamReadRequest::checked_lease(lease)?;
    Ok(access::connect(|client, caller| {
        lease::extend(client, caller, &held, lease)
    })?)
}

/// Ends the lease without moving the group's position: any member reads the records again at once.
/// False when another member took the lease since.
#[pg_extern]
fn stream_release(
    stream: Option<&str>,
    consumer_group: Option<&str>,
    partition: Option<i32>,
    lease_token: Option<Uuid>,
) -> Result<bool, ErrorReport> {
    let place = GroupPartition::check(stream, consumer_group, partition)?;
    let held = HeldLease::check(place, lease_token)?;
    Ok(access::connect(|client, caller| {
        lease::release(client, caller, &held)
    })?)
}

#[pg_extern]
fn stream_seek(
    stream: Option<&str>,
    consumer_group: Option<&str>,
    partition: Option<i32>,
    seq: Option<i64>,
) -> Result<(), ErrorReport> {
    let place = GroupPartition::check(stream, consumer_group, partition)?;
    let position = GroupPosition::check(place, seq)?;
    Ok(access::connect(|client, caller| {
        read::seek(client, caller, &position)
    })?)
}

#[pg_extern]
fn stream_seek_time(
    stream: Option<&str>,
    consumer_group: Option<&str>,
    at: Option<TimestampWithTimeZone>,
) -> Result<(), ErrorReport> {
    let stream = stream_name(stream)?;
    let consumer_group = group_name(consumer_group)?;
    let at = required(at, "at")?;
    Ok(access::connect(|client, caller| {
        read::seek_to_time(client, caller, stream, consumer_group, at)
    })?)
}

returns_records! {
    fn stream_range(
        stream: Option<&str>,
        partition: Option<i32>,
        from_seq: Option<i64>,
        max_records: default!(Option<i32>, 100),
    ) -> () {
        let stream = stream_name(stream)?;
        let partition = required(partition, "partition")?;
        let from_seq = required(from_seq, "from_seq")?;
        let max_records = read::checked_max_records(max_records)?;
        let records = access::connect(|client, caller| {
            read::range(client, caller, stream, partition, from_seq, max_records)
        })?;
        Ok(TableIterator::new(rows(records).map(
            |(partition, seq, _, subject, key, payload, headers, appended_at)| {
                (partition, seq, subject, key, payload, headers, appended_at)
            },
        )))
    }
}

/// `publish` appends every message whose subject matches `pattern` to the stream.
#[pg_extern]
fn subscribe_stream(stream: Option<&str>, pattern: Option<&str>) -> Result<bool, ErrorReport> {
    let stream = stream_name(stream)?;
    let pattern = checked_pattern(pattern)?;
    Ok(access::connect(|client, caller| {
        stream::subscription::subscribe(client, caller, stream, pattern)
    })?)
}

#[pg_extern]
fn unsubscribe_stream(stream: Option<&str>, pattern: Option<&str>) -> Result<bool, ErrorReport> {
    let stream = stream_name(stream)?;
    let pattern = checked_pattern(pattern)?;
    Ok(access::connect(|client, caller| {
        stream::subscription::unsubscribe(client, caller, stream, pattern)
    })?)
}
