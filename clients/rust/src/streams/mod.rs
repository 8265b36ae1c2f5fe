//! Streams (retained logs read by consumer groups): appending and reading in whatever transaction the
//! caller's client is in, the SQL functions one to one, and `StreamConsumer` built on them. Creating
//! streams and groups stays in SQL (`bussig.create_stream`, `bussig.create_consumer_group`), as
//! creating queues does.
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::error::Result;
use crate::sql;

mod consumer;

pub use consumer::{StreamConsumer, StreamStats};

/// How one record is appended; every field is optional, as `bussig.append`'s named arguments are.
#[derive(Clone, Debug, Default)]
pub struct AppendOptions {
    pub subject: Option<String>,
    pub headers: Option<Map<String, Value>>,
    pub key: Option<String>,
}

impl AppendOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// The record's subject (a bussig subject: dot-separated tokens).
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Adds one header (headers are a JSON object).
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.headers
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into());
        self
    }

    /// Records with the same key go to the same partition, so they are read in append order.
    /// Without a key a record goes to any partition.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

/// One record of an `append_batch`: its payload, and its own subject and key.
#[derive(Clone, Debug)]
pub struct AppendRecord<T> {
    pub payload: T,
    pub subject: Option<String>,
    pub key: Option<String>,
}

impl<T> AppendRecord<T> {
    pub fn new(payload: T) -> Self {
        AppendRecord {
            payload,
            subject: None,
            key: None,
        }
    }

    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// See `AppendOptions::key`.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

/// A record as a consumer group reads it. `lease_token` proves this member still holds the
/// partition when it commits (`stream_commit`); every record a read returns from one partition
/// carries the same token.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamRecord {
    pub partition: i32,
    /// 1, 2, 3… within the partition, in the order records became readable (commit order).
    pub seq: i64,
    pub lease_token: Uuid,
    pub subject: Option<String>,
    pub key: Option<String>,
    pub payload: Value,
    pub headers: Option<Value>,
    pub appended_at: DateTime<Utc>,
}

impl StreamRecord {
    fn from_row(row: &Row) -> Result<Self> {
        Ok(StreamRecord {
            partition: row.try_get(0)?,
            seq: row.try_get(1)?,
            lease_token: row.try_get(2)?,
            subject: row.try_get(3)?,
            key: row.try_get(4)?,
            payload: row.try_get(5)?,
            headers: row.try_get(6)?,
            appended_at: row.try_get(7)?,
        })
    }

    /// The payload decoded into `T`; `Error::Payload` when it does not fit.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(T::deserialize(&self.payload)?)
    }

    /// A header's value as text, when it is a string.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.as_ref()?.get(key)?.as_str()
    }
}

/// Headers as sent: with the current trace context when the `otel` feature is on.
fn headers_value(headers: Option<&Map<String, Value>>) -> Option<Value> {
    crate::trace::with_current_context(headers.cloned()).map(Value::Object)
}

/// Appends one record (`bussig.append`); the partition it went to. Its `seq` is given only once
/// the transaction commits, so no append can return it.
pub async fn append<C: GenericClient, T: Serialize + ?Sized>(
    client: &C,
    stream: &str,
    payload: &T,
    options: &AppendOptions,
) -> Result<i32> {
    let payload = serde_json::to_value(payload)?;
    // ::int: the function returns bigint, though a partition is an int everywhere else.
    sql::value(
        client,
        "SELECT bussig.append($1, $2, $3, $4, $5)::int",
        &[Type::TEXT, Type::JSONB, Type::TEXT, Type::JSONB, Type::TEXT],
        &[
            &stream,
            &payload,
            &options.subject,
            &headers_value(options.headers.as_ref()),
            &options.key,
        ],
    )
    .await
}

/// Appends every record in one statement (`bussig.append_batch`), each with its own subject and key
/// and all with the same headers; how many were appended.
pub async fn append_batch<C: GenericClient, T: Serialize>(
    client: &C,
    stream: &str,
    records: &[AppendRecord<T>],
    headers: Option<&Map<String, Value>>,
) -> Result<i64> {
    let payloads = records
        .iter()
        .map(|record| serde_json::to_value(&record.payload))
        .collect::<Result<Vec<Value>, _>>()?;
    // NULL rather than an array of NULLs when no record has one.
    let column = |field: fn(&AppendRecord<T>) -> &Option<String>| {
        let values: Vec<Option<&str>> = records.iter().map(|r| field(r).as_deref()).collect();
        values.iter().any(Option::is_some).then_some(values)
    };
    let subjects = column(|record| &record.subject);
    let keys = column(|record| &record.key);
    sql::value(
        client,
        "SELECT bussig.append_batch($1, $2, $3, $4, $5)",
        &[
            Type::TEXT,
            Type::JSONB_ARRAY,
            Type::TEXT_ARRAY,
            Type::JSONB,
            Type::TEXT_ARRAY,
        ],
        &[
            &stream,
            &payloads,
            &subjects,
            &headers_value(headers),
            &keys,
        ],
    )
    .await
}

/// The group's next records (`bussig.stream_read`), up to `max_records`, from partitions no other
/// member of the group holds; each partition read is leased to this caller for `lease` (longer with
/// `stream_extend_lease`), until `stream_commit` or `stream_release`. Records of one partition come
/// in `seq` order, one partition after another. With `wait`, waits that long for a record when none
/// is ready (not inside a REPEATABLE READ or SERIALIZABLE transaction, whose snapshot cannot move:
/// the call then returns at once).
pub async fn stream_read<C: GenericClient>(
    client: &C,
    stream: &str,
    group: &str,
    max_records: i32,
    wait: Option<Duration>,
    lease: Duration,
) -> Result<Vec<StreamRecord>> {
    let rows = sql::query(
        client,
        "SELECT partition, seq, lease_token, subject, key, payload, headers, appended_at
         FROM bussig.stream_read($1, $2, $3, $4, $5)",
        &[
            Type::TEXT,
            Type::TEXT,
            Type::INT4,
            Type::INTERVAL,
            Type::INTERVAL,
        ],
        &[
            &stream,
            &group,
            &max_records,
            &sql::Interval::of(wait),
            &sql::Interval(lease),
        ],
    )
    .await?;
    rows.iter().map(StreamRecord::from_row).collect()
}

/// Records that the group processed `partition` up to and including `seq`, and ends the lease
/// (`bussig.stream_commit`). False when the lease is stale (another member leased the partition
/// since): the position did not move and that member reads the records again. Commit in the
/// transaction of your own writes for an exactly-once effect.
pub async fn stream_commit<C: GenericClient>(
    client: &C,
    stream: &str,
    group: &str,
    partition: i32,
    seq: i64,
    lease_token: Uuid,
) -> Result<bool> {
    sql::value(
        client,
        "SELECT bussig.stream_commit($1, $2, $3, $4, $5)",
        &[Type::TEXT, Type::TEXT, Type::INT4, Type::INT8, Type::UUID],
        &[&stream, &group, &partition, &seq, &lease_token],
    )
    .await
}

/// Keeps this caller's lease of `partition` for `lease` from now (`bussig.stream_extend_lease`): a
/// slow handler's heartbeat. False when another member took the lease since (it had run out): that
/// member reads the records again, and this caller's commit will be refused.
pub async fn stream_extend_lease<C: GenericClient>(
    client: &C,
    stream: &str,
    group: &str,
    partition: i32,
    lease_token: Uuid,
    lease: Duration,
) -> Result<bool> {
    sql::value(
        client,
        "SELECT bussig.stream_extend_lease($1, $2, $3, $4, $5)",
        &[
            Type::TEXT,
            Type::TEXT,
            Type::INT4,
            Type::UUID,
            Type::INTERVAL,
        ],
        &[
            &stream,
            &group,
            &partition,
            &lease_token,
            &sql::Interval(lease),
        ],
    )
    .await
}

/// Ends this caller's lease of `partition` without moving the group's position
/// (`bussig.stream_release`): any member reads those records again at once, instead of after the
/// lease. False when another member took the lease since.
pub async fn stream_release<C: GenericClient>(
    client: &C,
    stream: &str,
    group: &str,
    partition: i32,
    lease_token: Uuid,
) -> Result<bool> {
    sql::value(
        client,
        "SELECT bussig.stream_release($1, $2, $3, $4)",
        &[Type::TEXT, Type::TEXT, Type::INT4, Type::UUID],
        &[&stream, &group, &partition, &lease_token],
    )
    .await
}

/// The group's next read of `partition` starts at `seq`, back or forward (`bussig.stream_seek`);
/// a lease on it ends.
pub async fn stream_seek<C: GenericClient>(
    client: &C,
    stream: &str,
    group: &str,
    partition: i32,
    seq: i64,
) -> Result<()> {
    sql::query(
        client,
        "SELECT bussig.stream_seek($1, $2, $3, $4)",
        &[Type::TEXT, Type::TEXT, Type::INT4, Type::INT8],
        &[&stream, &group, &partition, &seq],
    )
    .await?;
    Ok(())
}

/// Moves every partition of the group to its first record appended at or after `at`
/// (`bussig.stream_seek_time`); leases on them end.
pub async fn stream_seek_time<C: GenericClient>(
    client: &C,
    stream: &str,
    group: &str,
    at: DateTime<Utc>,
) -> Result<()> {
    sql::query(
        client,
        "SELECT bussig.stream_seek_time($1, $2, $3)",
        &[Type::TEXT, Type::TEXT, Type::TIMESTAMPTZ],
        &[&stream, &group, &at],
    )
    .await?;
    Ok(())
}
