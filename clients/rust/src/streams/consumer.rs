//! A member of a consumer group: long-polls `stream_read`, hands each partition's records to the
//! handler in order (partitions side by side), keeps each partition's lease while it has records of
//! it in hand, and commits each partition where its handler got to (or releases it).
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{stream_commit, stream_extend_lease, stream_read, stream_release, StreamRecord};
use crate::connection::{retry_connecting, Connector};
use crate::consumer::BUSY_POLL;
use crate::error::Result;
use crate::failure::Failure;

/// What a `StreamConsumer` has done so far; read it while it runs.
#[derive(Debug, Default)]
pub struct StreamStats {
    pub handled: AtomicU64,
    pub failed: AtomicU64,
    /// Handlers running now.
    pub in_flight: AtomicI64,
    /// Commits and releases refused because another member had leased the partition since (the
    /// lease had run out): its records are handled again there.
    pub stale_commits: AtomicU64,
    /// Connections lost and made again.
    pub reconnects: AtomicU64,
    /// The last handler failure, panic or failed commit, extension or release, in words.
    pub last_error: Mutex<Option<String>>,
}

impl StreamStats {
    fn note_error(&self, text: &str) {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some(text.to_string());
    }
}

/// A member of a stream's consumer group; configure it, then `run` it with a handler. Members of one
/// group, in this process or others, share the stream's partitions: one member at a time reads a
/// partition, so records of one key are handled in order across members. The group must exist
/// (`bussig.create_consumer_group`).
#[derive(Clone)]
pub struct StreamConsumer {
    stream: Arc<str>,
    group: Arc<str>,
    connector: Connector,
    concurrency: usize,
    max_records: i32,
    lease: Duration,
    wait: Duration,
    grace: Duration,
    stats: Arc<StreamStats>,
}

impl StreamConsumer {
    pub fn new(connector: Connector, stream: impl Into<String>, group: impl Into<String>) -> Self {
        StreamConsumer {
            stream: stream.into().into(),
            group: group.into().into(),
            connector,
            concurrency: 1,
            max_records: 100,
            lease: Duration::from_secs(30),
            wait: Duration::from_secs(5),
            grace: Duration::from_secs(10),
            stats: Arc::default(),
        }
    }

    /// Handlers running at once, each on a different partition (default 1). The member reads
    /// again only while it holds fewer partitions than this.
    pub fn concurrency(mut self, handlers: usize) -> Self {
        self.concurrency = handlers.max(1);
        self
    }

    /// The most records one read takes, over all the partitions it leases (default 100).
    pub fn max_records(mut self, records: i32) -> Self {
        self.max_records = records.max(1);
        self
    }

    /// How long a read keeps its partitions from the group's other members (default 30 s). The
    /// member extends the lease of a partition every third of it while it has records of that
    /// partition in hand, so a slow handler keeps its partition; a lease that could not be extended
    /// (a lost connection, or another member took it) ends the partition's share of the read when
    /// it runs out: no more of its records are handed out, and its commit may come too late. Set it
    /// above what one record takes.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long an idle member's read waits for a record (default 5 s): also the longest a shutdown
    /// waits for that read to return.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// How long a shutdown lets the handlers in hand finish (default 10 s). A handler still running
    /// then is dropped, unfinished: its partition commits the record before it, or is released, so
    /// its records go back to the group at once.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn stats(&self) -> Arc<StreamStats> {
        self.stats.clone()
    }

    /// Consumes until `shutdown` is cancelled. The records of one partition go to `handler` one after
    /// another in `seq` order; different partitions run side by side. When a partition's records of
    /// a read are done, the last one handled is committed with the partition's lease; when none was
    /// handled (shutdown came first), the lease is released (`stream_release`). Either ends the
    /// lease, so the records not handled go back to the group at once.
    ///
    /// - `Ok` means handled. A `Failure` (any kind: streams have no retry delay or dead letters) or
    ///   a panic leaves that partition's remaining records of the read unhandled: the ones before
    ///   are committed, so the failed record is read again at once; when it was the first, the lease
    ///   runs out first, so a record that always fails is tried once a lease. It holds up its
    ///   partition; return `Ok` to skip it.
    /// - A commit refused as stale (another member leased the partition after this lease ran out)
    ///   is counted in `stats().stale_commits`, not an error: that member handles the records again.
    /// - Shutdown: the member reads no more; each partition finishes the record in hand (within
    ///   `shutdown_grace`) and commits it. Records not started or not finished go back to the group
    ///   at once.
    /// - A lost connection is made again with a backoff; commits that were to go over it fail, and
    ///   those records are read again after the lease (at least once).
    ///
    /// Returns once every partition in hand is committed; an error other than a lost connection
    /// (an unknown stream or group, a missing privilege) ends it.
    pub async fn run<H, F>(self, handler: H, shutdown: CancellationToken) -> Result<()>
    where
        H: Fn(StreamRecord) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), Failure>> + Send + 'static,
    {
        let member = Arc::new(Member {
            stream: self.stream.clone(),
            group: self.group.clone(),
            handler,
            slots: Semaphore::new(self.concurrency),
            lease: self.lease,
            stats: self.stats.clone(),
            shutdown: shutdown.clone(),
            cut_off: CancellationToken::new(),
        });
        let mut partitions = JoinSet::new();
        let mut client = self.connect(&shutdown).await?;
        let outcome = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            while partitions.try_join_next().is_some() {}
            if partitions.len() >= self.concurrency {
                wait_for_a_partition(&mut partitions, &shutdown).await;
                continue;
            }
            // Long-poll only when idle: commits of partitions in hand go over this connection too.
            let idle = partitions.is_empty();
            let wait = idle.then_some(self.wait);
            let read = stream_read(
                &*client,
                &self.stream,
                &self.group,
                self.max_records,
                wait,
                self.lease,
            )
            .await;
            let records = match read {
                Ok(records) => records,
                Err(error) if error.is_connection() => {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    match self.connect(&shutdown).await {
                        Ok(connected) => client = connected,
                        Err(error) => break Err(error),
                    }
                    continue;
                }
                Err(error) => break Err(error),
            };
            if records.is_empty() && !idle {
                // Not for long: other partitions' records are read while one runs long.
                let _ = tokio::time::timeout(
                    self.wait.min(BUSY_POLL),
                    wait_for_a_partition(&mut partitions, &shutdown),
                )
                .await;
                continue;
            }
            let lease_ends = Instant::now() + self.lease;
            for records in by_partition(records) {
                let member = member.clone();
                partitions.spawn(member.handle_partition(client.clone(), records, lease_ends));
            }
        };
        let drained = async { while partitions.join_next().await.is_some() {} };
        tokio::pin!(drained);
        tokio::select! {
            _ = &mut drained => {}
            _ = sleep_after(&shutdown, self.grace) => {
                // Handlers still running are dropped; their partitions commit or release.
                member.cut_off.cancel();
                drained.await;
            }
        }
        outcome
    }

    async fn connect(&self, shutdown: &CancellationToken) -> Result<Arc<Client>> {
        let connector = &self.connector;
        retry_connecting(shutdown, || async move { Ok(Arc::new(connector().await?)) }).await
    }
}

/// Returns `grace` after `shutdown` was cancelled.
async fn sleep_after(shutdown: &CancellationToken, grace: Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace).await;
}

/// Waits until a partition in hand is done or shutdown is asked for.
async fn wait_for_a_partition(partitions: &mut JoinSet<()>, shutdown: &CancellationToken) {
    tokio::select! {
        _ = partitions.join_next() => {}
        _ = shutdown.cancelled() => {}
    }
}

/// A read's records, one list per partition, each in the order read.
fn by_partition(records: Vec<StreamRecord>) -> impl Iterator<Item = Vec<StreamRecord>> {
    let mut partitions: BTreeMap<i32, Vec<StreamRecord>> = BTreeMap::new();
    for record in records {
        partitions.entry(record.partition).or_default().push(record);
    }
    partitions.into_values()
}

/// What the partitions' tasks share.
struct Member<H> {
    stream: Arc<str>,
    group: Arc<str>,
    handler: H,
    /// One permit per handler running.
    slots: Semaphore,
    lease: Duration,
    stats: Arc<StreamStats>,
    shutdown: CancellationToken,
    /// Cancelled once shutdown's grace ran out: handlers still running are dropped.
    cut_off: CancellationToken,
}

/// This member's lease of one partition, as far as it knows.
struct Lease {
    partition: i32,
    token: Uuid,
    /// When it runs out unless extended again.
    ends: Instant,
    /// An extension was refused: another member has the partition.
    lost: bool,
    /// Ticks every third of the lease: time to extend it.
    heartbeat: Interval,
}

impl<H> Member<H> {
    /// Hands one partition's records to the handler in order until one fails, the lease runs out
    /// or shutdown is asked for, extending the lease meanwhile; then commits the last one handled,
    /// or releases the lease when none was.
    async fn handle_partition<F>(
        self: Arc<Self>,
        client: Arc<Client>,
        records: Vec<StreamRecord>,
        lease_ends: Instant,
    ) where
        H: Fn(StreamRecord) -> F,
        F: Future<Output = std::result::Result<(), Failure>>,
    {
        let period = (self.lease / 3).max(Duration::from_millis(1));
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut lease = Lease {
            partition: records[0].partition,
            token: records[0].lease_token,
            ends: lease_ends,
            lost: false,
            heartbeat,
        };
        let stats = &self.stats;
        let mut handled = None;
        let mut failed = false;
        for record in records {
            let acquire = async {
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => None,
                    permit = self.slots.acquire() => Some(permit.expect("never closed")),
                }
            };
            let Some(permit) = self.keeping(&client, &mut lease, acquire).await else {
                break;
            };
            if lease.lost || Instant::now() >= lease.ends {
                break;
            }
            let seq = record.seq;
            stats.in_flight.fetch_add(1, Ordering::Relaxed);
            let work = AssertUnwindSafe(async { (self.handler)(record).await }).catch_unwind();
            let work = async {
                tokio::select! {
                    outcome = work => Some(outcome),
                    _ = self.cut_off.cancelled() => None,
                }
            };
            let outcome = self.keeping(&client, &mut lease, work).await;
            stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            let Some(outcome) = outcome else {
                break;
            };
            let outcome = outcome.unwrap_or_else(|panic| Err(Failure::from_panic(&*panic)));
            match outcome {
                Ok(()) => {
                    stats.handled.fetch_add(1, Ordering::Relaxed);
                    handled = Some(seq);
                }
                Err(failure) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    stats.note_error(failure.text());
                    failed = true;
                    break;
                }
            }
        }
        let (stream, group) = (&*self.stream, &*self.group);
        let (partition, token) = (lease.partition, lease.token);
        let ended = match handled {
            Some(seq) => stream_commit(&*client, stream, group, partition, seq, token).await,
            // A first record that failed waits for the lease to run out: released, it would come
            // straight back, and a record that always fails would spin.
            None if failed => return,
            None => stream_release(&*client, stream, group, partition, token).await,
        };
        match ended {
            Ok(true) => {}
            Ok(false) => {
                stats.stale_commits.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => stats.note_error(&error.to_string()),
        }
    }

    /// Runs `work`, extending the lease whenever its heartbeat ticks meanwhile: beside the work,
    /// never instead of it (an extension held up by the connection must not hold up the handler,
    /// nor its cut-off at shutdown). Extended by `self.lease` from when it was asked. After a
    /// refusal no more records are handed out; after an error, none once the lease runs out.
    async fn keeping<T>(
        &self,
        client: &Client,
        lease: &mut Lease,
        work: impl Future<Output = T>,
    ) -> T {
        tokio::pin!(work);
        let mut extension: Option<(Instant, BoxFuture<'_, Result<bool>>)> = None;
        loop {
            tokio::select! {
                biased;
                outcome = &mut work => return outcome,
                extended = async { extension.as_mut().expect("checked").1.as_mut().await }, if extension.is_some() => {
                    let (asked, _) = extension.take().expect("checked");
                    match extended {
                        Ok(true) => lease.ends = lease.ends.max(asked + self.lease),
                        Ok(false) => lease.lost = true,
                        Err(error) => self.stats.note_error(&error.to_string()),
                    }
                }
                _ = lease.heartbeat.tick(), if extension.is_none() && !lease.lost => {
                    let asked = Instant::now();
                    let extending = stream_extend_lease(
                        client,
                        &self.stream,
                        &self.group,
                        lease.partition,
                        lease.token,
                        self.lease,
                    );
                    extension = Some((asked, Box::pin(extending)));
                }
            }
        }
    }
}
