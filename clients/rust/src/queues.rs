//! What `bussig.queues` says about queues: their settings and how many messages wait, for start-up
//! checks and lag metrics; and the backoff bussig's `nack` applies.
use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Row};

use crate::error::{Error, Result};
use crate::sql;

/// One queue's settings and counts, as `bussig.queues` shows them.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueInfo {
    pub name: String,
    /// None for a dead-letter queue (it has none of its own).
    pub dead_letter_queue: Option<String>,
    /// Every message the queue holds: exact.
    pub messages: i64,
    /// How `messages` splits, as the background worker last counted it (about a second old).
    pub ready: i64,
    pub delayed: i64,
    pub locked: i64,
    /// How long the oldest ready message has waited; zero when none is ready.
    pub oldest_ready_age: Duration,
    pub max_deliveries: i32,
    pub lock_timeout: Duration,
    pub message_ttl: Option<Duration>,
    pub retry_delay: Duration,
    pub retry_delay_max: Duration,
    pub retry_multiplier: f64,
    /// How long a `dedup_id` is remembered.
    pub dedup_window: Duration,
    /// The most messages locked at once across all consumers; None for no cap.
    pub max_in_flight: Option<i32>,
}

/// Intervals travel as seconds (tokio-postgres has no interval type); negative ones count as zero.
fn duration(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::MAX)
}

impl QueueInfo {
    fn from_row(row: &Row) -> QueueInfo {
        QueueInfo {
            name: row.get(0),
            dead_letter_queue: row.get(1),
            messages: row.get(2),
            ready: row.get(3),
            delayed: row.get(4),
            locked: row.get(5),
            oldest_ready_age: duration(row.get(6)),
            max_deliveries: row.get(7),
            lock_timeout: duration(row.get(8)),
            message_ttl: row.get::<_, Option<f64>>(9).map(duration),
            retry_delay: duration(row.get(10)),
            retry_delay_max: duration(row.get(11)),
            retry_multiplier: row.get(12),
            dedup_window: duration(row.get(13)),
            max_in_flight: row.get(14),
        }
    }
}

/// The queues among `names` that exist and the caller may see, in name order; a missing name is
/// simply absent. `NoExtension` when the database has no bussig.
pub async fn queues<C: GenericClient, S: AsRef<str>>(
    client: &C,
    names: &[S],
) -> Result<Vec<QueueInfo>> {
    let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
    let rows = sql::query(
        client,
        "SELECT queue, dead_letter_queue, coalesce(messages, 0)::bigint,
                coalesce(ready, 0)::bigint, coalesce(delayed, 0)::bigint, coalesce(locked, 0)::bigint,
                coalesce(extract(epoch FROM oldest_ready_age), 0)::float8,
                max_deliveries, extract(epoch FROM lock_timeout)::float8,
                extract(epoch FROM message_ttl)::float8,
                extract(epoch FROM retry_delay)::float8, extract(epoch FROM retry_delay_max)::float8,
                retry_multiplier, extract(epoch FROM dedup_window)::float8, max_in_flight
         FROM bussig.queues WHERE queue = ANY($1) ORDER BY queue",
        &[Type::TEXT_ARRAY],
        &[&names],
    )
    .await?;
    Ok(rows.iter().map(QueueInfo::from_row).collect())
}

/// The delay a `nack` without one of its own applies after delivery number `attempt` (1 for the first)
/// of a message of `queue`: `retry_delay` times `retry_multiplier` to the power `attempt - 1`, capped
/// at `retry_delay_max` (`bussig.retry_backoff`). `UnknownQueue` when the queue does not exist.
pub async fn retry_backoff<C: GenericClient>(
    client: &C,
    queue: &str,
    attempt: i32,
) -> Result<Duration> {
    let rows = sql::query(
        client,
        "SELECT extract(epoch FROM bussig.retry_backoff(q.retry_delay, q.retry_multiplier,
                                                       q.retry_delay_max, $2))::float8
         FROM bussig.queues q WHERE q.queue = $1",
        &[Type::TEXT, Type::INT4],
        &[&queue, &attempt],
    )
    .await?;
    match rows.first() {
        Some(row) => Ok(duration(row.try_get(0)?)),
        None => Err(Error::UnknownQueue(format!(
            "queue \"{queue}\" does not exist"
        ))),
    }
}

/// The queues a message published on `subject` would reach, each with the pattern that matched
/// (`bussig.match`). `InvalidArgument` when the subject is not a valid bussig subject.
pub async fn subscribers<C: GenericClient>(
    client: &C,
    subject: &str,
) -> Result<Vec<(String, String)>> {
    let rows = sql::query(
        client,
        "SELECT queue, pattern FROM bussig.match($1)",
        &[Type::TEXT],
        &[&subject],
    )
    .await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}
