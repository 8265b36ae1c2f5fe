//! Broadcast: every process gets every message published on a pattern (cache invalidation, config
//! reloads), through a queue of its own that lives as long as the process, and comes back with the
//! process's connections when the worker dropped it while the database was away.
use std::future::Future;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::connection::{retry_connecting, Connector, Current};
use crate::consumer::Consumer;
use crate::delivery::Message;
use crate::ephemeral::{self, Ephemeral};
use crate::error::{Error, Result};
use crate::failure::Failure;

/// A process's subscription to a pattern: its queue, and a consumer of it.
pub struct Broadcast {
    consumer: Consumer,
    queue: Ephemeral,
    connector: Connector,
}

impl Broadcast {
    /// Creates this process's queue (`bussig_broadcast_<uuid>`) subscribed to `pattern`.
    pub async fn subscribe(connector: Connector, pattern: &str) -> Result<Broadcast> {
        let client = connector().await?;
        let queue = ephemeral::create(&client, "bussig_broadcast", pattern).await?;
        Ok(Broadcast {
            consumer: Consumer::new(connector.clone(), queue.queue.clone()),
            queue,
            connector,
        })
    }

    /// The queue this process receives on.
    pub fn queue(&self) -> &str {
        &self.queue.queue
    }

    /// Adjusts the consumer (concurrency, waits, ...) before `run`.
    pub fn configure(mut self, configure: impl FnOnce(Consumer) -> Consumer) -> Self {
        self.consumer = configure(self.consumer);
        self
    }

    /// Consumes as `Consumer::run` does while heartbeating the queue, and drops the queue once
    /// `shutdown` is cancelled and the consumer has stopped. A consumer that finds the queue gone
    /// (dropped by the worker while the database was away) makes it again and goes on.
    pub async fn run<T, H, F>(self, handler: H, shutdown: CancellationToken) -> Result<()>
    where
        T: DeserializeOwned + Send + 'static,
        H: Fn(Message<T>) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), Failure>> + Send + 'static,
    {
        let connection = Current::new(Arc::new((self.connector)().await?), self.connector);
        let stop = CancellationToken::new();
        let alive = tokio::spawn(
            self.queue
                .clone()
                .keep_alive(connection.clone(), stop.clone()),
        );
        let handler = Arc::new(handler);
        let consumed = loop {
            let handler = handler.clone();
            let consumed = self
                .consumer
                .clone()
                .run(move |m| handler(m), shutdown.clone())
                .await;
            match consumed {
                Err(Error::UnknownQueue(_)) if !shutdown.is_cancelled() => {
                    // The connection may be lost too, and not known to be yet: tried until it is back.
                    let queue = &self.queue;
                    let connection = &connection;
                    let remade = retry_connecting(&shutdown, || {
                        connection.run(|client| async move { queue.subscribe(&client).await })
                    })
                    .await;
                    if let Err(error) = remade {
                        break Err(error);
                    }
                }
                consumed => break consumed,
            }
        };
        stop.cancel();
        let _ = alive.await;
        consumed
    }
}
