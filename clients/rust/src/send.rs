//! Sending and publishing, in whatever transaction the caller's client is in: pass a `Transaction` and
//! the messages commit or roll back with the application's own writes.
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio_postgres::GenericClient;

use crate::error::Result;
use crate::sql;
use tokio_postgres::types::Type;

/// How a message is sent; every field is optional, as `bussig.send`'s named arguments are.
#[derive(Clone, Debug, Default)]
pub struct SendOptions {
    pub headers: Option<serde_json::Map<String, Value>>,
    pub delay: Option<Duration>,
    pub priority: i32,
    pub dedup_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub group_id: Option<String>,
}

impl SendOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one header (headers are a JSON object).
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.headers
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into());
        self
    }

    /// Not deliverable before `delay` has passed.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Higher first; within a priority, in the order messages became ready.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// A second send with the same id within the queue's dedup_window is dropped.
    pub fn dedup_id(mut self, id: impl Into<String>) -> Self {
        self.dedup_id = Some(id.into());
        self
    }

    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// An ordered group: its messages are delivered one at a time, in send order (`group_id`). For
    /// `send_batch`, every message goes to this group.
    pub fn group_id(mut self, id: impl Into<String>) -> Self {
        self.group_id = Some(id.into());
        self
    }

    /// The queue a reply should go to (`bussig.reply`, or `request` in this crate).
    pub fn reply_to(mut self, queue: impl Into<String>) -> Self {
        self.reply_to = Some(queue.into());
        self
    }

    /// The headers, with the current trace context when the `otel` feature is on.
    fn headers_value(&self) -> Option<Value> {
        crate::trace::with_current_context(self.headers.clone()).map(Value::Object)
    }

    fn delay_interval(&self) -> Option<sql::Interval> {
        sql::Interval::of(self.delay)
    }
}

/// Sends one message; its id, or None when `dedup_id` found it a duplicate.
pub async fn send<C: GenericClient, T: Serialize + ?Sized>(
    client: &C,
    queue: &str,
    payload: &T,
    options: &SendOptions,
) -> Result<Option<i64>> {
    let sql = "SELECT bussig.send($1, $2, $3, $4, $5, $6, $7, $8, $9)";
    Ok(one_message(client, sql, queue, payload, options)
        .await?
        .get(0))
}

/// Runs `sql`, which takes the arguments `send` and `publish` share, for one message to `target`.
async fn one_message<C: GenericClient, T: Serialize + ?Sized>(
    client: &C,
    sql: &str,
    target: &str,
    payload: &T,
    options: &SendOptions,
) -> Result<tokio_postgres::Row> {
    let payload = serde_json::to_value(payload)?;
    let row = sql::query_one(
        client,
        sql,
        &[
            Type::TEXT,
            Type::JSONB,
            Type::JSONB,
            Type::INTERVAL,
            Type::INT4,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
        ],
        &[
            &target,
            &payload,
            &options.headers_value(),
            &options.delay_interval(),
            &options.priority,
            &options.dedup_id,
            &options.correlation_id,
            &options.reply_to,
            &options.group_id,
        ],
    )
    .await?;
    Ok(row)
}

/// Sends every payload to the queue in one statement, with the same options; their ids in order.
pub async fn send_batch<C: GenericClient, T: Serialize>(
    client: &C,
    queue: &str,
    payloads: &[T],
    options: &SendOptions,
) -> Result<Vec<i64>> {
    let payloads = payloads
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<Value>, _>>()?;
    let group_ids = options
        .group_id
        .as_ref()
        .map(|group| vec![group.clone(); payloads.len()]);
    let rows = sql::query(
        client,
        "SELECT bussig.send_batch($1, $2, $3, $4, $5, $6)",
        &[
            Type::TEXT,
            Type::JSONB_ARRAY,
            Type::JSONB,
            Type::INTERVAL,
            Type::INT4,
            Type::TEXT_ARRAY,
        ],
        &[
            &queue,
            &payloads,
            &options.headers_value(),
            &options.delay_interval(),
            &options.priority,
            &group_ids,
        ],
    )
    .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Publishes to every queue subscribed to a pattern the subject matches; how many queues got it.
pub async fn publish<C: GenericClient, T: Serialize + ?Sized>(
    client: &C,
    subject: &str,
    payload: &T,
    options: &SendOptions,
) -> Result<i32> {
    let sql = "SELECT bussig.publish($1, $2, $3, $4, $5, $6, $7, $8, $9)";
    Ok(one_message(client, sql, subject, payload, options)
        .await?
        .get(0))
}
