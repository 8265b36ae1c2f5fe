//! Request/reply: a `Requester` owns a reply queue for this process (ephemeral: the worker drops it
//! once its heartbeats stop), sends each request with `reply_to` naming it and a fresh correlation id,
//! and one task long-polls the queue and hands each reply to the request that waits for it. Both
//! connections come back after the database was lost, and the queue with them if the worker dropped
//! it meanwhile; requests in flight then time out.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::connection::{retry_connecting, Connector, Current};
use crate::delivery::{self, Message};
use crate::ephemeral::{self, Ephemeral};
use crate::error::{Error, Result};
use crate::send::{publish, send, SendOptions};

/// Requests waiting for their replies, by correlation id.
type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Message>>>>;

/// How long one read of the reply queue waits: also how late the task notices a shutdown.
const REPLY_WAIT: Duration = Duration::from_secs(1);
/// How long the reader pauses after an error that was not the connection's.
const PAUSE: Duration = Duration::from_secs(1);

/// Sends requests and waits for their replies. Cheap to share: clone the `Arc` it comes in.
pub struct Requester {
    /// Sends requests and heartbeats the reply queue.
    sender: Current,
    reply_queue: Ephemeral,
    waiting: Waiting,
    stop: CancellationToken,
}

impl Requester {
    /// Creates this process's reply queue (`bussig_reply_<uuid>`) and starts reading it, on two
    /// connections from `connector`: one sends requests, the other waits for replies.
    pub async fn start(connector: Connector) -> Result<Arc<Requester>> {
        let client = connector().await?;
        // An ephemeral queue is one subscribed with a ttl; nothing publishes on this subject.
        let reply_queue =
            ephemeral::create(&client, "bussig_reply", "_bussig.reply.{queue}").await?;
        let reader = connector().await?;
        let requester = Arc::new(Requester {
            sender: Current::new(Arc::new(client), connector.clone()),
            reply_queue,
            waiting: Arc::default(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(
            requester
                .reply_queue
                .clone()
                .keep_alive(requester.sender.clone(), requester.stop.clone()),
        );
        let replies = Replies {
            connector,
            queue: requester.reply_queue.clone(),
            waiting: requester.waiting.clone(),
            stop: requester.stop.clone(),
        };
        tokio::spawn(replies.read(reader));
        Ok(requester)
    }

    /// The queue replies come to.
    pub fn reply_queue(&self) -> &str {
        &self.reply_queue.queue
    }

    /// Sends `request` to `queue` and waits up to `timeout` for the reply, decoded into `R`.
    /// `Error::Timeout` when none came; a reply that comes later is acked and dropped.
    pub async fn request<Q, R>(
        &self,
        queue: &str,
        request: &Q,
        timeout: Duration,
    ) -> Result<Message<R>>
    where
        Q: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.ask(timeout, |options| {
            self.sender.run(|client| async move {
                send(&*client, queue, request, &options).await.map(drop)
            })
        })
        .await
    }

    /// As `request`, published on `subject`: the first reply of whoever subscribed to it wins.
    pub async fn request_subject<Q, R>(
        &self,
        subject: &str,
        request: &Q,
        timeout: Duration,
    ) -> Result<Message<R>>
    where
        Q: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.ask(timeout, |options| {
            self.sender.run(|client| async move {
                publish(&*client, subject, request, &options)
                    .await
                    .map(drop)
            })
        })
        .await
    }

    async fn ask<R, F>(
        &self,
        timeout: Duration,
        send_it: impl FnOnce(SendOptions) -> F,
    ) -> Result<Message<R>>
    where
        R: DeserializeOwned,
        F: std::future::Future<Output = Result<()>>,
    {
        let correlation_id = Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .expect("not poisoned")
            .insert(correlation_id.clone(), tx);
        // Whatever ends the request (an error, the timeout, the caller dropping this future) ends
        // its wait: a reply coming later finds nobody and is only acked.
        let _waiting = Forget {
            waiting: &self.waiting,
            correlation_id: &correlation_id,
        };
        let options = SendOptions::new()
            .reply_to(self.reply_queue.queue.clone())
            .correlation_id(correlation_id.clone());
        send_it(options).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(message)) => message
                .decode::<R>()
                .map_err(|(_, error)| Error::Payload(error)),
            Ok(Err(_)) => Err(Error::NotInState("the requester stopped".into())),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Stops reading replies and drops the reply queue.
    pub async fn stop(&self) -> Result<()> {
        self.stop.cancel();
        self.reply_queue.drop_queue(&*self.sender.get().await).await
    }
}

/// Takes a request's entry out of the waiting map when the request ends, however it ends.
struct Forget<'a> {
    waiting: &'a Waiting,
    correlation_id: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(self.correlation_id);
        }
    }
}

impl Drop for Requester {
    fn drop(&mut self) {
        // The reader stops; the queue goes with its missing heartbeats, or with `stop`.
        self.stop.cancel();
    }
}

/// The task that reads the reply queue.
struct Replies {
    connector: Connector,
    queue: Ephemeral,
    waiting: Waiting,
    stop: CancellationToken,
}

impl Replies {
    /// Long-polls the reply queue on `client` and hands each reply to the request waiting for it,
    /// acking it with the next read; until `stop`. A lost connection is made again, and the queue
    /// too if the worker dropped it meanwhile.
    async fn read(self, client: Client) {
        let mut client = Arc::new(client);
        let mut acks: Vec<(i64, Uuid)> = Vec::new();
        while !self.stop.is_cancelled() {
            let read = tokio::select! {
                read = delivery::ack_and_read(&*client, &self.queue.queue, &acks, 100, None, Some(REPLY_WAIT)) => read,
                _ = self.stop.cancelled() => break,
            };
            match read {
                Ok(replies) => {
                    acks = replies.iter().map(|r| (r.id, r.lock_token)).collect();
                    self.hand_out(replies);
                }
                Err(error) if error.is_connection() => {
                    // Acks sent with the lost call go again: stale tokens are skipped.
                    let connector = &self.connector;
                    match retry_connecting(&self.stop, || async { connector().await }).await {
                        Ok(connected) => client = Arc::new(connected),
                        Err(_) => self.pause().await,
                    }
                }
                Err(Error::UnknownQueue(_)) if !self.stop.is_cancelled() => {
                    acks.clear();
                    if self.queue.subscribe(&client).await.is_err() {
                        self.pause().await;
                    }
                }
                Err(_) => self.pause().await,
            }
        }
        if !acks.is_empty() {
            let _ = delivery::ack_batch(&*client, &self.queue.queue, &acks).await;
        }
    }

    fn hand_out(&self, replies: Vec<Message>) {
        for reply in replies {
            let Some(correlation_id) = reply.correlation_id.clone() else {
                continue;
            };
            let waiter = self
                .waiting
                .lock()
                .expect("not poisoned")
                .remove(&correlation_id);
            if let Some(waiter) = waiter {
                let _ = waiter.send(reply);
            }
        }
    }

    async fn pause(&self) {
        tokio::select! {
            _ = tokio::time::sleep(PAUSE) => {}
            _ = self.stop.cancelled() => {}
        }
    }
}

/// A reply decoded as JSON, for requests whose replies have no type of their own.
pub type Reply = Message<Value>;
