//! Queues of one process: subscribed with a ttl, so the worker drops them once their heartbeats stop
//! (a process that dies leaves nothing behind for long). One that lost the database long enough for
//! the worker to drop its queue makes the queue again once it is back.
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::connection::Current;
use crate::error::{Error, Result};
use crate::sql;
use tokio_postgres::types::Type;

/// How long an ephemeral queue outlives its last heartbeat; heartbeats come three times as often.
pub const TTL: Duration = Duration::from_secs(60);

/// How soon a heartbeat that failed is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// An ephemeral queue's name and the pattern it is subscribed to.
#[derive(Clone, Debug)]
pub struct Ephemeral {
    pub queue: String,
    pub pattern: String,
}

/// Creates `<prefix>_<uuid>`, subscribed to `pattern` (where `{queue}` stands for its name).
pub async fn create(client: &Client, prefix: &str, pattern: &str) -> Result<Ephemeral> {
    let queue = format!("{prefix}_{}", Uuid::new_v4().simple());
    let ephemeral = Ephemeral {
        pattern: pattern.replace("{queue}", &queue),
        queue,
    };
    ephemeral.subscribe(client).await?;
    Ok(ephemeral)
}

impl Ephemeral {
    /// Creates the queue when it is missing, and subscribes it (again).
    pub async fn subscribe(&self, client: &Client) -> Result<()> {
        sql::query(
            client,
            "SELECT bussig.subscribe($1, $2, $3)",
            &[Type::TEXT, Type::TEXT, Type::INTERVAL],
            &[&self.queue, &self.pattern, &sql::Interval(TTL)],
        )
        .await?;
        Ok(())
    }

    /// Tells the worker that the queue's owner is alive, and makes the queue again when the worker
    /// dropped it meanwhile (the owner was away from the database for longer than `TTL`).
    pub async fn heartbeat(&self, client: &Client) -> Result<()> {
        let beat = sql::query(
            client,
            "SELECT bussig.heartbeat($1)",
            &[Type::TEXT],
            &[&self.queue],
        )
        .await;
        match beat {
            Err(Error::UnknownQueue(_)) => self.subscribe(client).await,
            other => other.map(drop),
        }
    }

    /// Drops the queue.
    pub async fn drop_queue(&self, client: &Client) -> Result<()> {
        sql::query(
            client,
            "SELECT bussig.drop_queue($1)",
            &[Type::TEXT],
            &[&self.queue],
        )
        .await?;
        Ok(())
    }

    /// Heartbeats the queue every `TTL / 3` on `connection` (connected anew when it was lost, and
    /// tried again after `RETRY` when a heartbeat failed) until `stop`, then drops the queue.
    pub async fn keep_alive(self, connection: Current, stop: CancellationToken) {
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.cancelled() => break,
            }
            let this = &self;
            let beat = connection
                .run(|client| async move { this.heartbeat(&client).await })
                .await;
            next = tokio::time::Instant::now() + if beat.is_ok() { TTL / 3 } else { RETRY };
        }
        let _ = self.drop_queue(&*connection.get().await).await;
    }
}
