//! `Bus`: the simple case, over a connection pool. Sends and publishes each take a pooled connection
//! for one statement; consumers and requesters get connections of their own from the same settings.
//! To send inside your own transaction, call `send` with that transaction instead.
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Serialize;
use tokio_postgres::NoTls;

use crate::connection::{connect_no_tls, Connector};
use crate::consumer::Consumer;
use crate::delivery;
use crate::error::{Error, Result};
use crate::request::Requester;
use crate::send::{self, SendOptions};

/// A pool of connections to one database with bussig, and what runs over it.
#[derive(Clone)]
pub struct Bus {
    pool: Pool,
    conninfo: Arc<str>,
}

impl Bus {
    /// A bus over up to `max_connections` pooled connections to `conninfo` (without TLS). Connections
    /// are opened as they are needed.
    pub fn new(conninfo: &str, max_connections: usize) -> Result<Bus> {
        let config: tokio_postgres::Config = conninfo.parse()?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections.max(1))
            .build()
            .map_err(|error| Error::NotInState(format!("the connection pool: {error}")))?;
        Ok(Bus {
            pool,
            conninfo: conninfo.into(),
        })
    }

    /// The pool, for the application's own statements.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn connection(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|error| match error {
            deadpool_postgres::PoolError::Backend(error) => Error::from(error),
            other => Error::NotInState(format!("no pooled connection: {other}")),
        })
    }

    /// `send` on a pooled connection.
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        queue: &str,
        payload: &T,
        options: &SendOptions,
    ) -> Result<Option<i64>> {
        send::send(&**self.connection().await?, queue, payload, options).await
    }

    /// `send_batch` on a pooled connection.
    pub async fn send_batch<T: Serialize>(
        &self,
        queue: &str,
        payloads: &[T],
        options: &SendOptions,
    ) -> Result<Vec<i64>> {
        send::send_batch(&**self.connection().await?, queue, payloads, options).await
    }

    /// `publish` on a pooled connection.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        subject: &str,
        payload: &T,
        options: &SendOptions,
    ) -> Result<i32> {
        send::publish(&**self.connection().await?, subject, payload, options).await
    }

    /// `queue_depth` on a pooled connection.
    pub async fn queue_depth(&self, queue: &str) -> Result<i64> {
        delivery::queue_depth(&**self.connection().await?, queue).await
    }

    /// Opens connections for consumers and requesters (outside the pool: they hold theirs).
    pub fn connector(&self) -> Connector {
        connect_no_tls(self.conninfo.to_string())
    }

    /// A consumer of `queue`; configure it, then `run` it.
    pub fn consumer(&self, queue: impl Into<String>) -> Consumer {
        Consumer::new(self.connector(), queue)
    }

    /// A requester with this process's reply queue.
    pub async fn requester(&self) -> Result<Arc<Requester>> {
        Requester::start(self.connector()).await
    }
}
