//! Moving one route's messages: read a batch under lock, publish it, wait for the PubAcks, settle it
//! in bussig. One `Worker` is one batch in flight; a route has `concurrency` of them.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use tokio::sync::watch;
use tokio_postgres::NoTls;
use tracing::{debug, info, warn};

use bussig_client::{self as client, Error as BusError, QueueInfo};

use crate::bus::{held, Bus, Delivery};
use crate::config::{Config, Route};
use crate::lanes::{self, Lane, OnRejection};
use crate::metrics::RouteMetrics;
use crate::publish::{self, Outcome};

/// How often a relay on standby asks again for an ordered queue another relay drains.
const STANDBY_INTERVAL: Duration = Duration::from_secs(2);
/// Room above the longest read wait before the database session counts as hung.
const STATEMENT_TIMEOUT_MARGIN: Duration = Duration::from_secs(30);

/// Capped exponential backoff with jitter, so relays that lost the same server do not return in step.
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            next: first,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.cap);
        // 80% to 100% of the delay.
        let jitter = RandomState::new().build_hasher().finish() % 1000;
        delay.mul_f64(0.8 + 0.2 * jitter as f64 / 1000.0)
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Resolves once shutdown is asked for (or whoever could ask is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard wait_for returns must not live across an await of the caller.
    let _ = shutdown.wait_for(|stop| *stop).await.is_ok();
}

/// What every worker shares.
pub struct Shared {
    pub config: Arc<Config>,
    pub jetstream: async_nats::jetstream::Context,
}

/// How many times in a row a message JetStream answers with "no responders" is held and sent again
/// (with the unavailable backoff, from 200 ms: some seconds, what a stream's leader election takes)
/// before it counts as rejected: no stream captures its subject.
const NO_RESPONDERS_HELD: u32 = 5;

/// Keeps the in-flight gauge right whichever way a batch ends.
struct InFlight<'a> {
    metrics: &'a RouteMetrics,
    count: i64,
}

impl<'a> InFlight<'a> {
    fn new(metrics: &'a RouteMetrics, count: usize) -> InFlight<'a> {
        let count = count as i64;
        metrics.in_flight.fetch_add(count, Ordering::Relaxed);
        InFlight { metrics, count }
    }

    fn settled(&mut self, count: usize) {
        let count = (count as i64).min(self.count);
        self.count -= count;
        self.metrics.in_flight.fetch_sub(count, Ordering::Relaxed);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics
            .in_flight
            .fetch_sub(self.count, Ordering::Relaxed);
    }
}

pub struct Worker {
    pub route: Route,
    pub queue: QueueInfo,
    pub shared: Arc<Shared>,
    pub metrics: Arc<RouteMetrics>,
    pub shutdown: watch::Receiver<bool>,
    /// The batch a lost database session interrupted. Lock tokens outlive sessions, so after a
    /// reconnect the worker settles it before reading more, which keeps an ordered route in order.
    pub interrupted: Vec<Delivery>,
}

impl Worker {
    fn lock_timeout(&self) -> Duration {
        self.route.lock_timeout.unwrap_or(self.queue.lock_timeout)
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Sleeps for `delay`; false when shutdown came first.
    async fn pause(&mut self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = stopped(&mut self.shutdown) => false,
        }
    }

    /// Runs until shutdown, reconnecting to the database as long as it takes.
    pub async fn run(mut self) {
        let config = self.shared.config.clone();
        let statement_timeout = config.poll_wait + STATEMENT_TIMEOUT_MARGIN;
        let mut reconnect = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        while !self.stopping() {
            let bus = match Bus::connect(&config.database_url, statement_timeout).await {
                Ok(bus) => bus,
                Err(error) => {
                    warn!(route = %self.route.queue, %error, "cannot reach the database; retrying");
                    self.pause(reconnect.next_delay()).await;
                    continue;
                }
            };
            match self.drain(&bus, &mut reconnect).await {
                Ok(()) => break,
                Err(error) => {
                    warn!(route = %self.route.queue, %error, "database call failed; reconnecting");
                    self.pause(reconnect.next_delay()).await;
                }
            }
        }
        debug!(route = %self.route.queue, "worker stopped");
    }

    /// Reads and delivers batches on one session until shutdown (Ok) or a database error.
    async fn drain(&mut self, bus: &Bus, reconnect: &mut Backoff) -> Result<(), BusError> {
        if self.route.ordered {
            let mut announced = false;
            while !bus.try_lock_ordered_queue(&self.route.queue).await? {
                if !announced {
                    info!(route = %self.route.queue, "another relay drains this ordered queue; standing by");
                    announced = true;
                }
                if !self.pause(STANDBY_INTERVAL).await {
                    return Ok(());
                }
            }
            info!(route = %self.route.queue, "draining ordered queue");
        }
        let interrupted = std::mem::take(&mut self.interrupted);
        if !interrupted.is_empty() {
            let still_held = self.still_held(bus, &interrupted).await;
            let batch = match still_held {
                Ok(batch) => batch,
                Err(e) => {
                    self.interrupted = interrupted;
                    return Err(e);
                }
            };
            info!(route = %self.route.queue, messages = batch.len(), "resuming the interrupted batch");
            self.deliver_keeping(bus, batch).await?;
        }
        loop {
            let Some(batch) = self.read(bus).await? else {
                return Ok(());
            };
            reconnect.reset();
            if !batch.is_empty() {
                self.deliver_keeping(bus, batch).await?;
            }
            if self.stopping() {
                return Ok(());
            }
        }
    }

    /// The deliveries whose locks this relay still holds, locks extended; settled or lost ones go.
    async fn still_held(&self, bus: &Bus, batch: &[Delivery]) -> Result<Vec<Delivery>, BusError> {
        let still = client::extend_lock_batch(
            bus.client(),
            &self.route.queue,
            &held(batch),
            self.route.lock_timeout,
        )
        .await?;
        Ok(batch
            .iter()
            .filter(|d| still.contains(&d.id))
            .cloned()
            .collect())
    }

    /// Delivers a batch; when the database fails on the way, keeps it for after the reconnect.
    async fn deliver_keeping(&mut self, bus: &Bus, batch: Vec<Delivery>) -> Result<(), BusError> {
        let copy = batch.clone();
        let result = self.deliver(bus, batch).await;
        if result.is_err() {
            self.interrupted = copy;
        }
        result
    }

    /// The next batch, waiting for one up to `poll_wait`; None on shutdown.
    async fn read(&mut self, bus: &Bus) -> Result<Option<Vec<Delivery>>, BusError> {
        let read = client::read(
            bus.client(),
            &self.route.queue,
            self.route.batch_size as i32,
            self.route.lock_timeout,
            Some(self.shared.config.poll_wait),
        );
        tokio::pin!(read);
        tokio::select! {
            batch = &mut read => Ok(Some(batch?)),
            _ = stopped(&mut self.shutdown) => {
                let _ = bus.cancel_token().cancel_query(NoTls).await;
                // A read that finished before the cancel arrived has locked messages: give them back.
                if let Ok(batch) = read.await {
                    give_back(bus, &self.route.queue, &batch, "relay shutting down").await?;
                }
                Ok(None)
            }
        }
    }

    async fn deliver(&mut self, bus: &Bus, batch: Vec<Delivery>) -> Result<(), BusError> {
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let mut in_flight = InFlight::new(&metrics, batch.len());
        let config = self.shared.config.clone();
        let mut pending = Vec::with_capacity(batch.len());
        for delivery in batch {
            let subject = self.route.target_subject(delivery.subject.as_deref());
            match publish::build(
                &delivery,
                &self.route.queue,
                subject,
                &config.message_id_prefix,
            ) {
                Ok(outgoing) => pending.push((delivery, outgoing)),
                Err(why) => {
                    self.reject_for_good(bus, &delivery, "unpublishable", &why.to_string())
                        .await?;
                    in_flight.settled(1);
                }
            }
        }
        let lanes = if self.route.ordered {
            lanes::by_group(pending)
        } else {
            lanes::each_alone(pending)
        };
        self.deliver_lanes(bus, lanes, &mut in_flight).await?;
        metrics.observe_batch(started.elapsed());
        Ok(())
    }

    /// A message that can never be published goes to the dead-letter queue at once.
    async fn reject_for_good(
        &self,
        bus: &Bus,
        delivery: &Delivery,
        reason: &str,
        error: &str,
    ) -> Result<(), BusError> {
        warn!(route = %self.route.queue, message_id = delivery.id, reason, error, "dead-lettering message");
        let queue = &self.route.queue;
        let (id, token) = (delivery.id, delivery.lock_token);
        match client::dead_letter(bus.client(), queue, id, token, reason, Some(error)).await {
            Ok(moved) => {
                if moved {
                    self.metrics.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            // A queue without a dead-letter queue of its own (itself one): retry with backoff instead.
            Err(e) if !e.is_connection() => {
                client::nack(bus.client(), queue, id, token, None, Some(error)).await?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn count_outcome(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Stored { duplicate: false } => &self.metrics.published,
            Outcome::Stored { duplicate: true } => &self.metrics.duplicates,
            Outcome::Rejected(_) => &self.metrics.rejected,
            Outcome::Unavailable(_) | Outcome::NoResponders(_) => &self.metrics.unavailable,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Publishes the lanes' front messages side by side, awaits their PubAcks, and goes on until
    /// every lane is empty. Stored messages are acked; a rejected one is nacked or retried in place
    /// (see `OnRejection`); those NATS did not answer are held, their locks extended, and sent again
    /// with capped backoff.
    async fn deliver_lanes(
        &mut self,
        bus: &Bus,
        mut lanes: Vec<Lane>,
        in_flight: &mut InFlight<'_>,
    ) -> Result<(), BusError> {
        let queue = self.route.queue.clone();
        let lock_step = self.lock_timeout() / 3;
        let mut unavailable_retry = Backoff::new(Duration::from_millis(200), lock_step);
        let mut confirmed: Vec<Delivery> = Vec::new();
        let mut locks_extended = Instant::now();
        while let Some(first_due) = lanes.iter().map(|lane| lane.due).min() {
            let now = Instant::now();
            let waited = first_due > now;
            if waited {
                self.settle_confirmed(bus, &mut confirmed, in_flight)
                    .await?;
                if !self.pause((first_due - now).min(lock_step)).await {
                    let held: Vec<Delivery> = lanes
                        .into_iter()
                        .flat_map(|lane| lane.messages.into_iter().map(|(d, _)| d))
                        .collect();
                    give_back(bus, &queue, &held, "relay shutting down").await?;
                    return Ok(());
                }
            }
            if waited || locks_extended.elapsed() >= lock_step {
                self.keep_locks(bus, &mut lanes).await?;
                locks_extended = Instant::now();
                continue;
            }
            let due: Vec<usize> = (0..lanes.len()).filter(|&i| lanes[i].due <= now).collect();
            // Sent and awaited together, each within the ack timeout: one after another, a silent
            // NATS would hold the pass (and the locks it extends) for a timeout per message, and the
            // client's full command channel (it stops draining it while it reconnects) for another.
            // Nothing is sent while NATS is away: stale copies sent on reconnect could land after
            // later messages of their group.
            let jetstream = &self.shared.jetstream;
            let connected = jetstream.client().connection_state() == State::Connected;
            let ack_timeout = self.shared.config.ack_timeout;
            let outcomes = futures_util::future::join_all(due.iter().map(|&i| {
                let (_, outgoing) = lanes[i].messages.front().expect("lanes are never empty");
                publish::confirmed(jetstream, outgoing, connected, ack_timeout)
            }))
            .await;
            let mut unavailable = Vec::new();
            let mut last_unavailable = String::new();
            for (i, outcome) in due.into_iter().zip(outcomes) {
                self.count_outcome(&outcome);
                let lane = &mut lanes[i];
                match outcome {
                    Outcome::Stored { .. } => {
                        let (delivery, _) = lane.messages.pop_front().expect("front exists");
                        confirmed.push(delivery);
                        lane.rejections = 0;
                        lane.no_responders = 0;
                    }
                    // For a moment, as while a stream elects its leader: held like no answer.
                    Outcome::NoResponders(error) if lane.no_responders < NO_RESPONDERS_HELD => {
                        lane.no_responders += 1;
                        last_unavailable = error;
                        unavailable.push(i);
                    }
                    Outcome::Rejected(error) | Outcome::NoResponders(error) => {
                        lane.no_responders = 0;
                        self.rejected(bus, lane, &error, in_flight).await?;
                    }
                    Outcome::Unavailable(error) => {
                        last_unavailable = error;
                        unavailable.push(i);
                    }
                }
            }
            if unavailable.is_empty() {
                unavailable_retry.reset();
            } else {
                let delay = unavailable_retry.next_delay();
                warn!(route = %queue, messages = unavailable.len(), error = %last_unavailable,
                      retry_in = ?delay, "NATS did not confirm; holding the messages and sending them again");
                for i in unavailable {
                    lanes[i].due = Instant::now() + delay;
                }
            }
            lanes.retain(|lane| !lane.messages.is_empty());
        }
        self.settle_confirmed(bus, &mut confirmed, in_flight).await
    }

    /// JetStream refused a lane's front message: nack it with the queue's backoff, or retry it in
    /// place until its deliveries run out and then dead-letter it.
    async fn rejected(
        &self,
        bus: &Bus,
        lane: &mut Lane,
        error: &str,
        in_flight: &mut InFlight<'_>,
    ) -> Result<(), BusError> {
        let queue = &self.route.queue;
        let (delivery, outgoing) = lane.messages.front().expect("front exists");
        let attempts = delivery.delivery_count + lane.rejections;
        if lane.on_rejection == OnRejection::RetryInPlace && attempts < self.queue.max_deliveries {
            lane.rejections += 1;
            let delay = client::retry_backoff(bus.client(), queue, attempts).await?;
            warn!(route = %queue, message_id = delivery.id, subject = %outgoing.subject,
                  attempt = attempts, %error, retry_in = ?delay,
                  "JetStream rejected the message; later ungrouped messages wait behind it");
            lane.due = Instant::now() + delay;
            return Ok(());
        }
        let (delivery, outgoing) = lane.messages.pop_front().expect("front exists");
        lane.rejections = 0;
        in_flight.settled(1);
        if lane.on_rejection == OnRejection::RetryInPlace {
            return self
                .reject_for_good(bus, &delivery, "max_deliveries", error)
                .await;
        }
        warn!(route = %queue, message_id = delivery.id, subject = %outgoing.subject,
              delivery = delivery.delivery_count, %error, "JetStream rejected the message; nacked");
        let (id, token) = (delivery.id, delivery.lock_token);
        let given_back = client::nack(bus.client(), queue, id, token, None, Some(error)).await?;
        if given_back && delivery.delivery_count >= self.queue.max_deliveries {
            self.metrics.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
        // Nothing stays behind it in a grouped lane (bussig hands out one message of a group at a
        // time); should anything, it must not overtake.
        let behind: Vec<Delivery> = lane.messages.drain(..).map(|(d, _)| d).collect();
        if !behind.is_empty() {
            give_back(
                bus,
                queue,
                &behind,
                "an earlier message of its group was rejected",
            )
            .await?;
            in_flight.settled(behind.len());
        }
        Ok(())
    }

    async fn settle_confirmed(
        &self,
        bus: &Bus,
        confirmed: &mut Vec<Delivery>,
        in_flight: &mut InFlight<'_>,
    ) -> Result<(), BusError> {
        let acked = ack(bus, &self.route.queue, confirmed).await?;
        let lost = confirmed.len() - acked;
        if lost > 0 {
            // Stored in JetStream, but their locks ran out first: bussig delivers them again.
            warn!(route = %self.route.queue, messages = lost,
                  "the lock ran out before the ack of messages JetStream stored; they will be sent again");
            self.metrics
                .locks_lost
                .fetch_add(lost as u64, Ordering::Relaxed);
        }
        in_flight.settled(confirmed.len());
        confirmed.clear();
        Ok(())
    }

    /// Extends the locks of held messages; drops those whose lock was lost (another reader has
    /// them now, and JetStream will drop whichever copy comes second).
    async fn keep_locks(&self, bus: &Bus, lanes: &mut Vec<Lane>) -> Result<(), BusError> {
        let messages = lanes
            .iter()
            .flat_map(|lane| lane.messages.iter().map(|(d, _)| d));
        let still = client::extend_lock_batch(
            bus.client(),
            &self.route.queue,
            &held(messages),
            self.route.lock_timeout,
        )
        .await?;
        let mut lost = 0;
        for lane in lanes.iter_mut() {
            let before = lane.messages.len();
            lane.messages.retain(|(d, _)| still.contains(&d.id));
            lost += before - lane.messages.len();
        }
        lanes.retain(|lane| !lane.messages.is_empty());
        if lost > 0 {
            warn!(route = %self.route.queue, messages = lost, "lost the lock on held messages");
            self.metrics
                .locks_lost
                .fetch_add(lost as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Acks what JetStream stored (nothing to do for none): how many acks found their lock still held.
async fn ack(bus: &Bus, queue: &str, stored: &[Delivery]) -> Result<usize, BusError> {
    if stored.is_empty() {
        return Ok(0);
    }
    let acked = client::ack_batch(bus.client(), queue, &held(stored)).await?;
    Ok(usize::try_from(acked).unwrap_or(0).min(stored.len()))
}

/// Gives deliveries back to bussig at once, for another reader (or this relay after a restart).
async fn give_back(
    bus: &Bus,
    queue: &str,
    deliveries: &[Delivery],
    why: &str,
) -> Result<(), BusError> {
    let held = held(deliveries);
    client::nack_batch(bus.client(), queue, &held, Some(Duration::ZERO), Some(why)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<Duration> = (0..4).map(|_| backoff.next_delay()).collect();
        let expected = [100, 200, 350, 350].map(Duration::from_millis);
        for (delay, full) in delays.iter().zip(expected) {
            assert!(
                *delay <= full && *delay >= full.mul_f64(0.8),
                "{delay:?} vs {full:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
