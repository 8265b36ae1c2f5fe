//! Broadcast: every process gets every message published on a pattern (cache invalidation, config
//! reloads), through a queue of its own that lives as long as the process.
use std::future::Future;

use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::consumer::{Connector, Consumer, Failure};
use crate::delivery::Message;
use crate::ephemeral;
use crate::error::Result;

/// A process's subscription to a pattern: its queue, and a consumer of it.
pub struct Broadcast {
    consumer: Consumer,
    queue: String,
    connector: Connector,
}

impl Broadcast {
    /// Creates this process's queue (`bussig_broadcast_<uuid>`) subscribed to `pattern`.
    pub async fn subscribe(connector: Connector, pattern: &str) -> Result<Broadcast> {
        let client = connector().await?;
        let queue = ephemeral::create(&client, "bussig_broadcast", pattern).await?;
        Ok(Broadcast {
            consumer: Consumer::new(connector.clone(), queue.clone()),
            queue,
            connector,
        })
    }

    /// The queue this process receives on.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Adjusts the consumer (concurrency, waits, ...) before `run`.
    pub fn configure(mut self, configure: impl FnOnce(Consumer) -> Consumer) -> Self {
        self.consumer = configure(self.consumer);
        self
    }

    /// Consumes as `Consumer::run` does while heartbeating the queue, and drops the queue once
    /// `shutdown` is cancelled and the consumer has stopped.
    pub async fn run<T, H, F>(self, handler: H, shutdown: CancellationToken) -> Result<()>
    where
        T: DeserializeOwned + Send + 'static,
        H: Fn(Message<T>) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), Failure>> + Send + 'static,
    {
        let client = (self.connector)().await?;
        let stop = CancellationToken::new();
        let alive = tokio::spawn(ephemeral::keep_alive(
            client,
            self.queue.clone(),
            stop.clone(),
        ));
        let consumed = self.consumer.run(handler, shutdown).await;
        stop.cancel();
        let _ = alive.await;
        consumed
    }
}
