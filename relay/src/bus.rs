//! The bussig side: one PostgreSQL session. Every bussig call goes through `bussig-client` on
//! `Bus::client`; only the session itself (its settings, a health check) and the advisory lock that
//! elects one relay per ordered queue are the relay's own.

use std::time::Duration;

use bussig_client::Message;
use thiserror::Error;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use crate::config::redact;

/// One delivery of one message, as `bussig.read` returns it.
pub type Delivery = Message;

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("database connection string is not valid: {0}")]
    Url(tokio_postgres::Error),
    #[error("cannot connect to the database at {url}: {source}")]
    Connect {
        url: String,
        source: tokio_postgres::Error,
    },
    #[error("cannot set up the database session: {0}")]
    Setup(bussig_client::Error),
}

pub struct Bus {
    client: Client,
}

impl Bus {
    /// Opens a session; `statement_timeout` guards against a server that stops answering.
    pub async fn connect(url: &str, statement_timeout: Duration) -> Result<Bus, ConnectError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(ConnectError::Url)?;
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
                .map_err(|source| ConnectError::Connect {
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
            .await
            .map_err(|e| ConnectError::Setup(e.into()))?;
        Ok(Bus { client })
    }

    /// The session, for `bussig_client`'s calls.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The session, for a transaction of several bussig calls.
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    pub async fn ping(&self) -> Result<(), bussig_client::Error> {
        self.client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Takes the session advisory lock that makes this session the only relay draining an ordered
    /// queue; false when another session holds it. It goes with the session.
    pub async fn try_lock_ordered_queue(&self, queue: &str) -> Result<bool, bussig_client::Error> {
        let row = self
            .client
            .query_typed(
                "SELECT pg_try_advisory_lock(hashtext('bussig-relay'), hashtext($1))",
                &[(&queue, tokio_postgres::types::Type::TEXT)],
            )
            .await?;
        Ok(row.first().is_some_and(|row| row.get(0)))
    }

    /// A handle that cancels the statement running on this session, e.g. a waiting read.
    pub fn cancel_token(&self) -> tokio_postgres::CancelToken {
        self.client.cancel_token()
    }
}

/// The id and lock token of each delivery, as bussig's batch calls take them.
pub fn held<'a>(deliveries: impl IntoIterator<Item = &'a Delivery>) -> Vec<(i64, Uuid)> {
    deliveries
        .into_iter()
        .map(|d| (d.id, d.lock_token))
        .collect()
}
