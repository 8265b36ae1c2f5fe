//! Request/reply: a `Requester` owns a reply queue for this process (ephemeral: the worker drops it
//! once its heartbeats stop), sends each request with `reply_to` naming it and a fresh correlation id,
//! and one task long-polls the queue and hands each reply to the request that waits for it.
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

use crate::consumer::Connector;
use crate::delivery::{self, Message};
use crate::ephemeral;
use crate::error::{Error, Result};
use crate::send::{publish, send, SendOptions};
use crate::sql;
use tokio_postgres::types::Type;

/// Requests waiting for their replies, by correlation id.
type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Message>>>>;

/// How long one read of the reply queue waits: also how late the task notices a shutdown.
const REPLY_WAIT: Duration = Duration::from_secs(1);

/// Sends requests and waits for their replies. Cheap to share: clone the `Arc` it comes in.
pub struct Requester {
    client: Client,
    reply_queue: String,
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
            client,
            reply_queue,
            waiting: Arc::default(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(read_replies(
            reader,
            requester.reply_queue.clone(),
            requester.waiting.clone(),
            requester.stop.clone(),
        ));
        Ok(requester)
    }

    /// The queue replies come to.
    pub fn reply_queue(&self) -> &str {
        &self.reply_queue
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
        self.ask(timeout, |options| async move {
            send(&self.client, queue, request, &options).await.map(drop)
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
        self.ask(timeout, |options| async move {
            publish(&self.client, subject, request, &options)
                .await
                .map(drop)
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
            .reply_to(self.reply_queue.clone())
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
        sql::query(
            &self.client,
            "SELECT bussig.drop_queue($1)",
            &[Type::TEXT],
            &[&self.reply_queue],
        )
        .await?;
        Ok(())
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

/// Long-polls the reply queue, acks every reply and hands it to the request waiting for it, and
/// heartbeats the queue; until `stop`.
async fn read_replies(client: Client, queue: String, waiting: Waiting, stop: CancellationToken) {
    let mut acks: Vec<(i64, Uuid)> = Vec::new();
    let mut last_heartbeat = tokio::time::Instant::now();
    while !stop.is_cancelled() {
        if last_heartbeat.elapsed() >= ephemeral::TTL / 3 {
            let _ = ephemeral::heartbeat(&client, &queue).await;
            last_heartbeat = tokio::time::Instant::now();
        }
        let read = tokio::select! {
            read = delivery::ack_and_read(&client, &queue, &acks, 100, None, Some(REPLY_WAIT)) => read,
            _ = stop.cancelled() => break,
        };
        let Ok(replies) = read else {
            // The connection is gone: requests time out, and the queue ends with its heartbeats.
            break;
        };
        acks = replies
            .iter()
            .map(|reply| (reply.id, reply.lock_token))
            .collect();
        for reply in replies {
            let Some(correlation_id) = reply.correlation_id.clone() else {
                continue;
            };
            let waiter = waiting
                .lock()
                .expect("not poisoned")
                .remove(&correlation_id);
            if let Some(waiter) = waiter {
                let _ = waiter.send(reply);
            }
        }
    }
    if !acks.is_empty() {
        let _ = delivery::ack_batch(&client, &queue, &acks).await;
    }
}

/// A reply decoded as JSON, for requests whose replies have no type of their own.
pub type Reply = Message<Value>;
