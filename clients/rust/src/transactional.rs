//! Transactional handlers: the handler's database writes and the ack of its message commit in one
//! transaction, or roll back together. Each handler in flight has a connection of its own; the
//! consumer's loop (reads, lock extension, nacks) stays on its connection.
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use tokio_postgres::{Client, Transaction};
use tokio_util::sync::CancellationToken;

use crate::connection::Connector;
use crate::consumer::Consumer;
use crate::delivery::Message;
use crate::error::Result;
use crate::failure::Failure;

/// What a transactional handler returns: a future that borrows the transaction.
pub type TransactionalFuture<'a> =
    Pin<Box<dyn Future<Output = std::result::Result<(), Failure>> + Send + 'a>>;

/// Idle connections for handlers, opened as they are needed (at most one per handler in flight).
struct Connections {
    connector: Connector,
    idle: Mutex<Vec<Client>>,
}

impl Connections {
    async fn take(&self) -> Result<Client> {
        let idle = self.idle.lock().expect("not poisoned").pop();
        match idle {
            Some(client) if !client.is_closed() => Ok(client),
            _ => (self.connector)().await,
        }
    }

    fn give_back(&self, client: Client) {
        if !client.is_closed() {
            self.idle.lock().expect("not poisoned").push(client);
        }
    }
}

impl Consumer {
    /// As `run`, but `handler` also gets the transaction in which its message's ack commits: what it
    /// writes there and the ack commit together, or neither does. `Ok` commits; an error or a panic
    /// rolls the transaction back and nacks (or dead-letters) the message as `run` does. When the lock
    /// was lost before the commit (another consumer has the message now), the transaction is rolled
    /// back too: the other delivery does the work.
    ///
    /// ```no_run
    /// # use bussig_client::*;
    /// # async fn example(consumer: Consumer, shutdown: CancellationToken) -> Result<()> {
    /// consumer
    ///     .run_transactional(
    ///         |m: &Message<i64>, tx| Box::pin(async move {
    ///             tx.execute("UPDATE accounts SET balance = balance + $1", &[&m.payload]).await?;
    ///             Ok(())
    ///         }),
    ///         shutdown,
    ///     )
    ///     .await
    /// # }
    /// ```
    pub async fn run_transactional<T, H>(
        self,
        handler: H,
        shutdown: CancellationToken,
    ) -> Result<()>
    where
        T: DeserializeOwned + Send + Sync + 'static,
        H: for<'a> Fn(&'a Message<T>, &'a Transaction<'a>) -> TransactionalFuture<'a>
            + Send
            + Sync
            + 'static,
    {
        let connections = Arc::new(Connections {
            connector: self.connector(),
            idle: Mutex::default(),
        });
        let handler = Arc::new(handler);
        self.run(
            move |message: Message<T>| {
                let (connections, handler) = (connections.clone(), handler.clone());
                async move {
                    let mut client = connections.take().await?;
                    let outcome = in_transaction(&mut client, &message, &*handler).await;
                    connections.give_back(client);
                    outcome
                }
            },
            shutdown,
        )
        .await
    }
}

/// Runs the handler and the ack in one transaction on `client`; an error rolls both back.
async fn in_transaction<T, H>(
    client: &mut Client,
    message: &Message<T>,
    handler: &H,
) -> std::result::Result<(), Failure>
where
    H: for<'a> Fn(&'a Message<T>, &'a Transaction<'a>) -> TransactionalFuture<'a>,
{
    let tx = client.transaction().await?;
    handler(message, &tx).await?;
    // A reply sent in the transaction acked the message there already.
    message.mark_settling();
    let acked = message.answered()
        || crate::delivery::ack(&tx, &message.queue, message.id, message.lock_token).await?;
    if !acked {
        // Dropping the transaction rolls it back.
        return Err(Failure::Error(
            "the message's lock ran out before the handler's transaction committed".into(),
        ));
    }
    tx.commit().await?;
    // Acked with the commit: the consumer has no ack of its own to send.
    message.mark_settled();
    Ok(())
}
