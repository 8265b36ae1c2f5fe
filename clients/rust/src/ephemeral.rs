//! Queues of one process: subscribed with a ttl, so the worker drops them once their heartbeats stop
//! (a process that dies leaves nothing behind for long).
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::Result;
use crate::sql;
use tokio_postgres::types::Type;

/// How long an ephemeral queue outlives its last heartbeat; heartbeats come three times as often.
pub const TTL: Duration = Duration::from_secs(60);

/// Creates `<prefix>_<uuid>`, subscribed to `pattern`, and returns its name.
pub async fn create(client: &Client, prefix: &str, pattern: &str) -> Result<String> {
    let queue = format!("{prefix}_{}", Uuid::new_v4().simple());
    let pattern = pattern.replace("{queue}", &queue);
    sql::query(
        client,
        "SELECT bussig.subscribe($1, $2, $3)",
        &[Type::TEXT, Type::TEXT, Type::INTERVAL],
        &[&queue, &pattern, &sql::Interval(TTL)],
    )
    .await?;
    Ok(queue)
}

/// Tells the worker that `queue`'s owner is alive; an ephemeral queue missing heartbeats for `TTL`
/// is dropped. Beat every `TTL / 3`.
pub async fn heartbeat(client: &Client, queue: &str) -> Result<()> {
    sql::query(
        client,
        "SELECT bussig.heartbeat($1)",
        &[Type::TEXT],
        &[&queue],
    )
    .await?;
    Ok(())
}

/// Heartbeats `queue` on `client` until `stop`, then drops it.
pub async fn keep_alive(client: Client, queue: String, stop: CancellationToken) {
    let mut beat = tokio::time::interval(TTL / 3);
    loop {
        tokio::select! {
            _ = beat.tick() => {
                let _ = heartbeat(&client, &queue).await;
            }
            _ = stop.cancelled() => break,
        }
    }
    let _ = sql::query(
        &client,
        "SELECT bussig.drop_queue($1)",
        &[Type::TEXT],
        &[&queue],
    )
    .await;
}
