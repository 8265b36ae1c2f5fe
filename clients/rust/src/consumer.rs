//! A consumer framework for one queue: handlers run concurrently, acks ride on the next read
//! (`ack_and_read`: one round trip per batch at steady state), an idle consumer long-polls, locks are
//! extended while a handler runs past half of them, and shutdown finishes or gives back everything.
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::connection::{retry_connecting, Connector, Current};
use crate::delivery::{self, Message};
use crate::error::{Error, Result};
use crate::failure::Failure;
use crate::settle_batch::nack_batch;

/// What a consumer has done so far; read it while it runs.
#[derive(Debug, Default)]
pub struct Stats {
    pub handled: AtomicU64,
    pub failed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub in_flight: AtomicI64,
    /// Connections lost and made again.
    pub reconnects: AtomicU64,
    /// Handlers whose lock was gone when the consumer came to extend it (`Message::lock_lost`).
    pub locks_lost: AtomicU64,
}

/// A consumer of one queue; configure it, then `run` it with a handler.
#[derive(Clone)]
pub struct Consumer {
    queue: Arc<str>,
    connector: Connector,
    concurrency: usize,
    batch: i32,
    lock_timeout: Duration,
    wait: Duration,
    grace: Duration,
    prepared_statements: bool,
    stats: Arc<Stats>,
}

/// How long a busy loop whose read found nothing waits for a handler (a stream member: for a
/// partition) before it reads again.
pub(crate) const BUSY_POLL: Duration = Duration::from_millis(250);
/// How soon an extension that failed (not one that found the lock gone) is tried again.
const EXTENSION_RETRY: Duration = Duration::from_secs(1);

/// A handler's message, and how it ended.
enum Settled {
    Acked(i64, Uuid),
    Done,
    /// Cut off by shutdown: to be given back at once.
    Unfinished(i64, Uuid),
}

impl Consumer {
    pub fn new(connector: Connector, queue: impl Into<String>) -> Self {
        Consumer {
            queue: queue.into().into(),
            connector,
            concurrency: 1,
            batch: 10,
            lock_timeout: Duration::from_secs(30),
            wait: Duration::from_secs(5),
            grace: Duration::from_secs(10),
            prepared_statements: false,
            stats: Arc::default(),
        }
    }

    /// Handlers in flight at once (default 1).
    pub fn concurrency(mut self, handlers: usize) -> Self {
        self.concurrency = handlers.max(1);
        self
    }

    /// The most messages one read takes (default 10; never more than free handler slots).
    pub fn batch(mut self, messages: i32) -> Self {
        self.batch = messages.clamp(1, 1000);
        self
    }

    /// How long a delivery is locked (default 30 s); a handler that runs past half has it extended.
    pub fn lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.lock_timeout = lock_timeout;
        self
    }

    /// How long an idle consumer's read waits for a message (default 5 s): also the longest a
    /// shutdown waits for that read to return.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// How long a shutdown lets handlers in flight finish (default 10 s); the rest are given back.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Keeps the consumer's read statement prepared on its connection (default off): the server then
    /// skips parsing and planning it on every call, about a tenth of a millisecond. Only for a direct
    /// connection, or a pooler that keeps prepared statements across transactions (pgbouncer 1.21+
    /// with `max_prepared_statements`); pgbouncer in transaction pooling before that loses them.
    pub fn prepared_statements(mut self, prepared: bool) -> Self {
        self.prepared_statements = prepared;
        self
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    pub(crate) fn connector(&self) -> Connector {
        self.connector.clone()
    }

    /// Consumes until `shutdown` is cancelled, handing each message, decoded into `T`, to `handler`.
    /// `Ok` acks it; a `Failure` nacks or dead-letters it; a panic nacks it with the panic's message; a
    /// payload that does not decode is dead-lettered as `undecodable`. Returns once everything fetched
    /// is settled or given back.
    pub async fn run<T, H, F>(self, handler: H, shutdown: CancellationToken) -> Result<()>
    where
        T: DeserializeOwned + Send + 'static,
        H: Fn(Message<T>) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), Failure>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let (settled_tx, mut settled_rx) = mpsc::unbounded_channel::<Settled>();
        let mut tasks = JoinSet::new();
        let (mut client, mut prepared) = self.reconnect(&shutdown).await?;
        // The connection handlers extend, nack and dead-letter on: the one a reconnect made last.
        let current = Current::new(client.clone(), self.connector.clone());
        let mut acks: Vec<(i64, Uuid)> = Vec::new();
        // An error that ends the loop; what was fetched is settled or given back first.
        let mut failed: Option<Error> = None;
        while !shutdown.is_cancelled() {
            if !tasks.is_empty() {
                // Handlers that are about to finish do so first: their acks ride on this read and
                // their slots fill its batch, instead of a short read now and another right after.
                tokio::task::yield_now().await;
            }
            while let Ok(settled) = settled_rx.try_recv() {
                if let Settled::Acked(id, token) = settled {
                    acks.push((id, token));
                }
            }
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits();
            if free == 0 {
                wait_for_a_handler(&mut settled_rx, &mut tasks, &shutdown, &mut acks).await;
                continue;
            }
            // Long-poll only when idle: a busy consumer must come back to hand in its acks.
            let idle = tasks.is_empty();
            let wait = idle.then_some(self.wait);
            let want = (free as i32).min(self.batch);
            let read = delivery::ack_and_read_with(
                &*client,
                prepared.as_ref(),
                &self.queue,
                &acks,
                want,
                Some(self.lock_timeout),
                wait,
            )
            .await;
            let messages = match read {
                Ok(messages) => {
                    acks.clear();
                    messages
                }
                Err(error) if error.is_connection() => {
                    // Acks sent with the lost call may or may not have committed; resent, stale
                    // tokens are skipped.
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    match self.reconnect(&shutdown).await {
                        Ok(connected) => (client, prepared) = connected,
                        Err(error) => {
                            failed = Some(error);
                            break;
                        }
                    }
                    current.set(client.clone()).await;
                    continue;
                }
                // Rolled back, acks with it: they go with the next call.
                Err(error) if error.is_transient() => continue,
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            };
            if shutdown.is_cancelled() {
                self.give_back(&client, &messages, "the consumer is shutting down")
                    .await;
                break;
            }
            let empty = messages.is_empty();
            for mut message in messages {
                let permit = slots.clone().acquire_owned().await.expect("never closed");
                message.connection = Some(delivery::Connection::new(current.clone()));
                let message = match message.decode::<T>() {
                    Ok(message) => message,
                    Err((message, error)) => {
                        let text = error.to_string();
                        let (id, token) = (message.id, message.lock_token);
                        let moved = dead_letter_or_give_back(
                            &client,
                            &self.queue,
                            (id, token),
                            "undecodable",
                            Some(&text),
                        )
                        .await;
                        if matches!(moved, Ok(true)) {
                            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                };
                let run = Handling {
                    client: current.clone(),
                    queue: self.queue.clone(),
                    lock_timeout: self.lock_timeout,
                    stats: self.stats.clone(),
                    settled: settled_tx.clone(),
                };
                let handler = handler.clone();
                self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
                tasks.spawn(async move {
                    run.handle(message, |m| handler(m), permit).await;
                });
            }
            if empty && !idle {
                // Not for long: messages that come while a handler runs long are read with free
                // slots, at most this late.
                let _ = tokio::time::timeout(
                    self.wait.min(BUSY_POLL),
                    wait_for_a_handler(&mut settled_rx, &mut tasks, &shutdown, &mut acks),
                )
                .await;
            }
        }
        let drained = self.drain(&current, tasks, settled_rx, acks).await;
        match failed {
            Some(error) => Err(error),
            None => drained,
        }
    }

    /// Lets handlers in flight finish within the grace period, acks what they finished, and gives
    /// back (nack with no delay) the messages of those that did not.
    async fn drain(
        &self,
        current: &Current,
        mut tasks: JoinSet<()>,
        mut settled_rx: mpsc::UnboundedReceiver<Settled>,
        mut acks: Vec<(i64, Uuid)>,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.grace;
        while !tasks.is_empty() {
            if tokio::time::timeout_at(deadline, tasks.join_next())
                .await
                .is_err()
            {
                break;
            }
        }
        // Handlers cut off at the deadline report their messages as unfinished (see GiveBack).
        tasks.shutdown().await;
        let mut unfinished = Vec::new();
        while let Ok(settled) = settled_rx.try_recv() {
            match settled {
                Settled::Acked(id, token) => acks.push((id, token)),
                Settled::Unfinished(id, token) => unfinished.push((id, token)),
                Settled::Done => {}
            }
        }
        // On the connection as of now (a handler may have made it anew while the loop waited), and
        // the give-backs whether or not the acks went through.
        let queue = &*self.queue;
        let acked = match acks.is_empty() {
            true => Ok(0),
            false => {
                let acks = &acks;
                current
                    .run_settling(|client| async move {
                        delivery::ack_batch(&*client, queue, acks).await
                    })
                    .await
            }
        };
        let unfinished = &unfinished;
        let given_back = current
            .run_settling(|client| async move {
                let why = Some("the consumer shut down");
                nack_batch(&*client, queue, unfinished, Some(Duration::ZERO), why).await
            })
            .await;
        acked.and(given_back).map(drop)
    }

    async fn give_back(&self, client: &Client, messages: &[Message], why: &str) {
        for message in messages {
            let _ = delivery::nack(
                client,
                &self.queue,
                message.id,
                message.lock_token,
                Some(Duration::ZERO),
                Some(why),
            )
            .await;
        }
    }

    /// Connects, retrying with a capped backoff until it succeeds or `shutdown` is cancelled; with
    /// the read statement prepared on the connection when asked for.
    async fn reconnect(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<(Arc<Client>, Option<Statement>)> {
        let (connector, prepare) = (&self.connector, self.prepared_statements);
        retry_connecting(shutdown, || async move {
            let client = connector().await?;
            let prepared = match prepare {
                true => Some(delivery::prepare_ack_and_read(&client).await?),
                false => None,
            };
            Ok((Arc::new(client), prepared))
        })
        .await
    }
}

/// Waits until a handler settles (keeping its ack), a handler's task ends (one that settled before
/// the loop last looked has nothing more to send), or shutdown is asked for.
async fn wait_for_a_handler(
    settled_rx: &mut mpsc::UnboundedReceiver<Settled>,
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
    acks: &mut Vec<(i64, Uuid)>,
) {
    tokio::select! {
        Some(settled) = settled_rx.recv() => {
            if let Settled::Acked(id, token) = settled {
                acks.push((id, token));
            }
        }
        Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        _ = shutdown.cancelled() => {}
    }
}

/// What one handler task needs.
struct Handling {
    client: Current,
    queue: Arc<str>,
    lock_timeout: Duration,
    stats: Arc<Stats>,
    settled: mpsc::UnboundedSender<Settled>,
}

impl Handling {
    /// Runs the handler and settles; `permit` (the handler's slot) is free before the loop hears of
    /// the settle, so that it never waits for a slot already given back.
    async fn handle<T, F>(
        self,
        message: Message<T>,
        handler: impl FnOnce(Message<T>) -> F,
        permit: OwnedSemaphorePermit,
    ) where
        F: Future<Output = std::result::Result<(), Failure>>,
    {
        let (id, token) = (message.id, message.lock_token);
        let flags = message
            .connection
            .as_ref()
            .map(|connection| (connection.settled.clone(), connection.settling.clone()));
        let (settled_by_handler, settling) = flags.unzip();
        let lock_lost = message.lock_lost();
        let guard = GiveBack {
            handling: Some(&self),
            id,
            token,
        };
        let outcome = {
            #[cfg(feature = "otel")]
            let context = crate::trace::process_context(&message);
            let work = handler(message);
            #[cfg(feature = "otel")]
            let work = opentelemetry::context::FutureExt::with_context(work, context);
            let work = AssertUnwindSafe(work).catch_unwind();
            // Settled by the handler, or being settled in a transaction: nothing to keep.
            let settling = || {
                let set = |flag: &Option<Arc<AtomicBool>>| {
                    flag.as_ref().is_some_and(|f| f.load(Ordering::Acquire))
                };
                set(&settling) || set(&settled_by_handler)
            };
            self.keeping_the_lock(work, id, token, &lock_lost, settling)
                .await
        };
        std::mem::forget(guard);
        let stats = &self.stats;
        let settled = match outcome {
            Ok(Ok(())) => {
                stats.handled.fetch_add(1, Ordering::Relaxed);
                let already =
                    settled_by_handler.is_some_and(|settled| settled.load(Ordering::Acquire));
                if already {
                    Settled::Done
                } else {
                    Settled::Acked(id, token)
                }
            }
            Ok(Err(failure)) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                self.fail(id, token, failure).await;
                Settled::Done
            }
            Err(panic) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                self.fail(id, token, Failure::from_panic(&*panic)).await;
                Settled::Done
            }
        };
        stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        drop(permit);
        let _ = self.settled.send(settled);
    }

    /// Runs `work`, extending the lock every half of it meanwhile. An extension runs beside the
    /// work, never instead of it: a transaction of the handler's that settles the message holds its
    /// row, and an extension waiting for that row must not keep the transaction from its commit.
    /// None starts once `settling` (such a transaction has begun to settle it). An extension that
    /// finds the lock gone (not merely unreachable) cancels `lock_lost`, and none follows.
    async fn keeping_the_lock<T>(
        &self,
        work: impl Future<Output = T>,
        id: i64,
        token: Uuid,
        lock_lost: &CancellationToken,
        settling: impl Fn() -> bool,
    ) -> T {
        tokio::pin!(work);
        // The first extension half a lock from now. Not `interval`'s immediate first tick: the
        // timer's millisecond granularity made awaiting it cost each message up to a millisecond.
        let period = self.lock_timeout / 2;
        let mut extend = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut extension: Option<BoxFuture<'_, Result<bool>>> = None;
        loop {
            tokio::select! {
                outcome = &mut work => return outcome,
                extended = async { extension.as_mut().expect("checked").await }, if extension.is_some() => {
                    extension = None;
                    match extended {
                        Ok(false) if !settling() => {
                            self.stats.locks_lost.fetch_add(1, Ordering::Relaxed);
                            lock_lost.cancel();
                        }
                        // Unreachable now: tried again soon, not half a lock later, when the lock
                        // may be gone.
                        Err(_) => extend.reset_after(EXTENSION_RETRY.min(period)),
                        _ => {}
                    }
                }
                _ = extend.tick(), if extension.is_none() && !lock_lost.is_cancelled() => {
                    if !settling() {
                        let (queue, lock) = (&self.queue, Some(self.lock_timeout));
                        extension = Some(Box::pin(self.client.run(move |client| async move {
                            delivery::extend_lock(&*client, queue, id, token, lock).await
                        })));
                    }
                }
            }
        }
    }

    async fn fail(&self, id: i64, token: Uuid, failure: Failure) {
        let (queue, failure) = (&self.queue, &failure);
        let dead_lettered = self
            .client
            .run_settling(|client| async move {
                match failure {
                    Failure::Retry { delay, error } => {
                        delivery::nack(&*client, queue, id, token, *delay, Some(error)).await?;
                        Ok(false)
                    }
                    Failure::Error(error) => {
                        delivery::nack(&*client, queue, id, token, None, Some(error)).await?;
                        Ok(false)
                    }
                    Failure::DeadLetter { reason, error } => {
                        let error = error.as_deref();
                        dead_letter_or_give_back(&client, queue, (id, token), reason, error).await
                    }
                }
            })
            .await;
        if matches!(dead_lettered, Ok(true)) {
            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Dead-letters a delivery; one the queue refuses to dead-letter (it has no dead-letter queue: 55000)
/// is given back with the queue's backoff instead, the refusal as its error, so that it does not sit
/// locked until its lock runs out and come back at once. Whether it was dead-lettered.
async fn dead_letter_or_give_back(
    client: &Client,
    queue: &str,
    (id, token): (i64, Uuid),
    reason: &str,
    error: Option<&str>,
) -> Result<bool> {
    match delivery::dead_letter(client, queue, id, token, reason, error).await {
        Err(refused) if !refused.is_connection() => {
            let why = format!("not dead-lettered ({reason}): {refused}");
            delivery::nack(client, queue, id, token, None, Some(&why)).await?;
            Ok(false)
        }
        moved => moved,
    }
}

/// A handler cut off by shutdown (its task aborted) has its message given back at once, so that
/// nothing waits for the lock to run out.
struct GiveBack<'a> {
    handling: Option<&'a Handling>,
    id: i64,
    token: Uuid,
}

impl Drop for GiveBack<'_> {
    fn drop(&mut self) {
        let Some(handling) = self.handling.take() else {
            return;
        };
        handling.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let _ = handling
            .settled
            .send(Settled::Unfinished(self.id, self.token));
    }
}
