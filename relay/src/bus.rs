//! The bussig side: one PostgreSQL session and the SQL calls the relay makes on it.

use std::time::Duration;

use serde_json::Value;
use thiserror::Error;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Row};
use uuid::Uuid;

use crate::config::redact;

#[derive(Debug, Error)]
pub enum BusError {
    #[error("database connection string is not valid: {0}")]
    Url(tokio_postgres::Error),
    #[error("cannot connect to the database at {url}: {source}")]
    Connect {
        url: String,
        source: tokio_postgres::Error,
    },
    #[error("the database has no bussig extension (run CREATE EXTENSION bussig): {0}")]
    NoExtension(tokio_postgres::Error),
    #[error("{0}")]
    Query(#[from] tokio_postgres::Error),
}

impl BusError {
    /// A lost or broken session: reconnect rather than give up.
    pub fn is_connection(&self) -> bool {
        match self {
            BusError::Query(e) => e.is_closed() || e.code().is_none(),
            BusError::Connect { .. } => true,
            _ => false,
        }
    }
}

/// One delivery of one message, as bussig.read returns it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: i64,
    pub token: Uuid,
    pub subject: Option<String>,
    pub payload: Value,
    pub headers: Option<Value>,
    pub delivery_count: i32,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
}

impl Delivery {
    fn from_row(row: &Row) -> Delivery {
        Delivery {
            id: row.get(0),
            token: row.get(1),
            subject: row.get(2),
            payload: row.get(3),
            headers: row.get(4),
            delivery_count: row.get(5),
            correlation_id: row.get(6),
            reply_to: row.get(7),
        }
    }
}

/// What `bussig.queues` says about a queue the relay drains.
#[derive(Debug, Clone)]
pub struct QueueInfo {
    pub name: String,
    pub max_deliveries: i32,
    pub lock_timeout: Duration,
}

/// Intervals travel as seconds: tokio-postgres has no interval type.
fn seconds(duration: Option<Duration>) -> Option<f64> {
    duration.map(|d| d.as_secs_f64())
}

pub struct Bus {
    client: Client,
}

impl Bus {
    /// Opens a session; `statement_timeout` guards against a server that stops answering.
    pub async fn connect(url: &str, statement_timeout: Duration) -> Result<Bus, BusError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(BusError::Url)?;
        // The connection string may name the session itself, e.g. to tell relays apart.
        if config.get_application_name().is_none() {
            config.application_name("bussig-relay");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        // Notice a peer that vanished without closing the socket well before the OS default of hours.
        config.keepalives_idle(Duration::from_secs(30));
        let (client, connection) =
            config
                .connect(NoTls)
                .await
                .map_err(|source| BusError::Connect {
                    url: redact(url),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "database connection ended");
            }
        });
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                statement_timeout.as_millis()
            ))
            .await?;
        Ok(Bus { client })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    pub async fn ping(&self) -> Result<(), BusError> {
        self.client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// The queues among `names` that exist, with the settings the relay needs.
    pub async fn queues(&self, names: &[String]) -> Result<Vec<QueueInfo>, BusError> {
        let rows = self
            .client
            .query(
                "SELECT queue, max_deliveries, extract(epoch FROM lock_timeout)::float8
                 FROM bussig.queues WHERE queue = ANY($1)",
                &[&names],
            )
            .await
            .map_err(|e| match e.code() {
                Some(code)
                    if *code == SqlState::UNDEFINED_TABLE
                        || *code == SqlState::INVALID_SCHEMA_NAME =>
                {
                    BusError::NoExtension(e)
                }
                _ => BusError::Query(e),
            })?;
        Ok(rows
            .iter()
            .map(|r| QueueInfo {
                name: r.get(0),
                max_deliveries: r.get(1),
                lock_timeout: Duration::from_secs_f64(r.get::<_, f64>(2).max(0.0)),
            })
            .collect())
    }

    /// `(queue, ready, age of the oldest ready message in seconds)` for the lag metrics.
    pub async fn lag(&self, names: &[String]) -> Result<Vec<(String, i64, f64)>, BusError> {
        let rows = self
            .client
            .query(
                "SELECT queue, ready::bigint, coalesce(extract(epoch FROM oldest_ready_age), 0)::float8
                 FROM bussig.queues WHERE queue = ANY($1)",
                &[&names],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Takes the session advisory lock that makes this session the only relay draining an ordered
    /// queue; false when another session holds it. It goes with the session.
    pub async fn try_lock_ordered_queue(&self, queue: &str) -> Result<bool, BusError> {
        let row = self
            .client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('bussig-relay'), hashtext($1))",
                &[&queue],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Locks up to `max` messages, waiting up to `wait` for the first.
    pub async fn read(
        &self,
        queue: &str,
        max: u32,
        lock_timeout: Option<Duration>,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BusError> {
        let rows = self
            .client
            .query(
                "SELECT message_id, lock_token, subject, payload, headers, delivery_count,
                        correlation_id, reply_to
                 FROM bussig.read($1, $2, $3::float8 * interval '1 second', $4::float8 * interval '1 second')",
                &[&queue, &(max as i32), &seconds(lock_timeout), &wait.as_secs_f64()],
            )
            .await?;
        Ok(rows.iter().map(Delivery::from_row).collect())
    }

    /// A handle that cancels the statement running on this session, e.g. a waiting read.
    pub fn cancel_token(&self) -> tokio_postgres::CancelToken {
        self.client.cancel_token()
    }

    /// Acknowledges deliveries: they are gone from the queue. Returns how many were still held.
    pub async fn ack(&self, queue: &str, deliveries: &[&Delivery]) -> Result<i64, BusError> {
        if deliveries.is_empty() {
            return Ok(0);
        }
        let (ids, tokens) = ids_and_tokens(deliveries);
        let row = self
            .client
            .query_one(
                "SELECT bussig.ack_batch($1, $2, $3)",
                &[&queue, &ids, &tokens],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Gives deliveries back after `delay`, or after the queue's backoff when None. On a message's
    /// last allowed delivery bussig moves it to the dead-letter queue instead.
    pub async fn nack(
        &self,
        queue: &str,
        deliveries: &[&Delivery],
        delay: Option<Duration>,
        error: &str,
    ) -> Result<i64, BusError> {
        if deliveries.is_empty() {
            return Ok(0);
        }
        let (ids, tokens) = ids_and_tokens(deliveries);
        let row = self
            .client
            .query_one(
                "SELECT count(*) FROM unnest($2::bigint[], $3::uuid[]) AS d(id, token)
                 WHERE bussig.nack($1, d.id, d.token, $4::float8 * interval '1 second', $5)",
                &[&queue, &ids, &tokens, &seconds(delay), &error],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Extends the locks; returns the ids whose lock this session still holds.
    pub async fn extend_locks(
        &self,
        queue: &str,
        deliveries: &[&Delivery],
        lock_timeout: Option<Duration>,
    ) -> Result<Vec<i64>, BusError> {
        if deliveries.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens) = ids_and_tokens(deliveries);
        let rows = self
            .client
            .query(
                "SELECT d.id FROM unnest($2::bigint[], $3::uuid[]) AS d(id, token)
                 WHERE bussig.extend_lock($1, d.id, d.token, $4::float8 * interval '1 second')",
                &[&queue, &ids, &tokens, &seconds(lock_timeout)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Moves one delivery to the dead-letter queue now.
    pub async fn dead_letter(
        &self,
        queue: &str,
        delivery: &Delivery,
        reason: &str,
        error: &str,
    ) -> Result<bool, BusError> {
        let row = self
            .client
            .query_one(
                "SELECT bussig.dead_letter($1, $2, $3, reason => $4, error => $5)",
                &[&queue, &delivery.id, &delivery.token, &reason, &error],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The delay bussig's nack would apply before delivery `attempt` of a message of `queue`.
    pub async fn retry_backoff(&self, queue: &str, attempt: i32) -> Result<Duration, BusError> {
        let row = self
            .client
            .query_one(
                "SELECT extract(epoch FROM bussig.retry_backoff(q.retry_delay, q.retry_multiplier,
                                                              q.retry_delay_max, $2))::float8
                 FROM bussig.queues q WHERE q.queue = $1",
                &[&queue, &attempt],
            )
            .await?;
        Ok(Duration::from_secs_f64(row.get::<_, f64>(0).max(0.0)))
    }
}

fn ids_and_tokens(deliveries: &[&Delivery]) -> (Vec<i64>, Vec<Uuid>) {
    deliveries.iter().map(|d| (d.id, d.token)).unzip()
}
