//! Inbound routes: JetStream messages into bussig, each landing once. A worker takes a batch from a
//! durable pull consumer, sends every message to bussig with its `dedup_id` in one transaction, and
//! acks the batch to NATS only after the commit. A message whose ack never reached NATS (a crash, a
//! lost connection, an ack_wait that ran out) is delivered again with the same dedup_id, and bussig,
//! which remembered the id in the same commit, enqueues nothing the second time.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Stream as Messages;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::Message as NatsMessage;
use bussig_client::Error as BusError;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio_postgres::GenericClient;
use tracing::{debug, info, warn};

use crate::bus::Bus;
use crate::config::{Inbound, Target};
use crate::incoming::{self, Incoming};
use crate::metrics::InboundMetrics;
use crate::relay::{stopped, Backoff};

/// How long NATS waits before delivering again a message bussig refused for now.
const REFUSED_RETRY: Duration = Duration::from_secs(5);
/// No bussig call waits: a statement this slow means a server that stopped answering.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// What became of one message in bussig.
#[derive(Debug, PartialEq)]
enum Stored {
    /// Enqueued now.
    New,
    /// bussig had it already: a redelivery.
    Duplicate,
    /// Never storable (too large, invalid): terminated in NATS.
    Rejected(String),
    /// Refused for now (unknown queue, no privilege): NATS delivers it again later.
    Refused(String),
}

pub struct InboundWorker {
    pub inbound: Inbound,
    pub consumer: PullConsumer,
    pub database_url: String,
    pub metrics: Arc<InboundMetrics>,
    pub shutdown: watch::Receiver<bool>,
}

impl InboundWorker {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn pause(&mut self, delay: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut self.shutdown) => {}
        }
    }

    /// Runs until shutdown; a lost database or NATS connection is opened again as long as it takes.
    /// A batch in flight at shutdown is finished: stored and acked.
    pub async fn run(mut self) {
        let name = self.inbound.name();
        let mut retry = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut bus: Option<Bus> = None;
        let mut messages: Option<Messages> = None;
        while !self.stopping() {
            if bus.as_ref().is_none_or(Bus::is_closed) {
                match Bus::connect(&self.database_url, STATEMENT_TIMEOUT).await {
                    Ok(connected) => bus = Some(connected),
                    Err(error) => {
                        warn!(inbound = %name, %error, "cannot reach the database; retrying");
                        self.pause(retry.next_delay()).await;
                        continue;
                    }
                }
            }
            let stream = match &mut messages {
                Some(stream) => stream,
                None => match self.subscribe().await {
                    Ok(stream) => messages.insert(stream),
                    Err(error) => {
                        warn!(inbound = %name, %error, "cannot pull from the consumer; retrying");
                        self.pause(retry.next_delay()).await;
                        continue;
                    }
                },
            };
            let batch = match self.next_batch(stream).await {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(error) => {
                    warn!(inbound = %name, %error, "pulling from the consumer failed; pulling again");
                    messages = None;
                    self.pause(retry.next_delay()).await;
                    continue;
                }
            };
            let session = bus.as_mut().expect("connected above");
            match self.deliver(session, batch).await {
                Ok(()) => retry.reset(),
                Err(error) => {
                    // Nothing of the batch was acked: NATS delivers it again after ack_wait.
                    warn!(inbound = %name, %error, "database call failed; reconnecting");
                    bus = None;
                    self.pause(retry.next_delay()).await;
                }
            }
        }
        debug!(inbound = %name, "inbound worker stopped");
    }

    async fn subscribe(&self) -> Result<Messages, async_nats::Error> {
        let messages = self
            .consumer
            .stream()
            .max_messages_per_batch(self.inbound.batch_size as usize)
            .messages()
            .await?;
        Ok(messages)
    }

    /// The messages ready now, at least one and at most `batch_size`; None on shutdown.
    async fn next_batch(
        &mut self,
        messages: &mut Messages,
    ) -> Result<Option<Vec<NatsMessage>>, String> {
        let first = tokio::select! {
            next = messages.next() => next,
            _ = stopped(&mut self.shutdown) => return Ok(None),
        };
        let mut batch = match first {
            Some(Ok(message)) => vec![message],
            Some(Err(error)) => return Err(error.to_string()),
            None => return Err("the consumer's message stream ended".into()),
        };
        // Whatever else has arrived joins the batch; an error shows again on the next wait.
        while batch.len() < self.inbound.batch_size as usize {
            match messages.next().now_or_never() {
                Some(Some(Ok(message))) => batch.push(message),
                _ => break,
            }
        }
        Ok(Some(batch))
    }

    /// Stores a batch in bussig, then settles each message in NATS. Err: a database failure, with
    /// nothing acked.
    async fn deliver(&self, bus: &mut Bus, batch: Vec<NatsMessage>) -> Result<(), BusError> {
        let mut storable = Vec::with_capacity(batch.len());
        for message in batch {
            match convert(&message, self.inbound.group_id_header.as_deref()) {
                Ok(incoming) => storable.push((message, incoming)),
                Err(why) => self.settle(&message, Stored::Rejected(why)).await,
            }
        }
        if storable.is_empty() {
            return Ok(());
        }
        let outcomes = match self.store_together(bus, &storable).await {
            Ok(outcomes) => outcomes,
            Err(error) if error.is_connection() => return Err(error),
            // One message spoiled the transaction: find it by storing them one by one.
            Err(error) => {
                debug!(inbound = %self.inbound.name(), %error, "storing the batch failed; storing one by one");
                self.store_each(bus, &storable).await?
            }
        };
        for ((message, _), outcome) in storable.iter().zip(outcomes) {
            self.settle(message, outcome).await;
        }
        Ok(())
    }

    /// Every message in one transaction, the sends pipelined: all or nothing.
    async fn store_together(
        &self,
        bus: &mut Bus,
        storable: &[(NatsMessage, Incoming)],
    ) -> Result<Vec<Stored>, BusError> {
        let transaction = bus.client_mut().transaction().await?;
        let sends = storable
            .iter()
            .map(|(_, incoming)| store(&transaction, &self.inbound.target, incoming));
        let stored = futures_util::future::join_all(sends)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        transaction.commit().await?;
        Ok(stored)
    }

    /// Each message in a transaction of its own, telling the ones bussig refuses from the others.
    async fn store_each(
        &self,
        bus: &Bus,
        storable: &[(NatsMessage, Incoming)],
    ) -> Result<Vec<Stored>, BusError> {
        let mut outcomes = Vec::with_capacity(storable.len());
        for (_, incoming) in storable {
            let outcome = match store(bus.client(), &self.inbound.target, incoming).await {
                Ok(stored) => stored,
                Err(error) if error.is_connection() => return Err(error),
                Err(
                    error @ (BusError::TooLarge(_)
                    | BusError::InvalidArgument(_)
                    | BusError::NullArgument(_)),
                ) => Stored::Rejected(error.to_string()),
                Err(error) => Stored::Refused(error.to_string()),
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// Tells NATS what became of a message, after its bussig transaction ended. A lost ack costs a
    /// redelivery, which bussig drops.
    async fn settle(&self, message: &NatsMessage, outcome: Stored) {
        let name = self.inbound.name();
        let (counter, ack) = match &outcome {
            Stored::New => (&self.metrics.stored, AckKind::Ack),
            Stored::Duplicate => (&self.metrics.duplicates, AckKind::Ack),
            Stored::Rejected(error) => {
                warn!(inbound = %name, subject = %message.subject, %error,
                      "bussig cannot take the message; terminated in NATS");
                (&self.metrics.rejected, AckKind::Term)
            }
            Stored::Refused(error) => {
                warn!(inbound = %name, subject = %message.subject, %error,
                      retry_in = ?REFUSED_RETRY, "bussig refused the message; NATS delivers it again");
                (&self.metrics.failed, AckKind::Nak(Some(REFUSED_RETRY)))
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = message.ack_with(ack).await {
            debug!(inbound = %name, %error, "ack to NATS failed; the message will come again");
        }
    }
}

/// The bussig message for a NATS message, or why there can be none.
fn convert(message: &NatsMessage, group_id_header: Option<&str>) -> Result<Incoming, String> {
    let info = message.info().map_err(|e| e.to_string())?;
    incoming::incoming(message, info.stream, info.stream_sequence, group_id_header)
        .map_err(|e| e.to_string())
}

/// Sends or publishes one message with its dedup_id.
async fn store<C: GenericClient>(
    client: &C,
    target: &Target,
    incoming: &Incoming,
) -> Result<Stored, BusError> {
    let new = match target {
        Target::Queue(queue) => {
            bussig_client::send(client, queue, &incoming.payload, &incoming.options)
                .await?
                .is_some()
        }
        Target::Subject(subject) => {
            bussig_client::publish(client, subject, &incoming.payload, &incoming.options).await? > 0
        }
    };
    Ok(if new { Stored::New } else { Stored::Duplicate })
}

/// Logs where an inbound route's messages go, once at start.
pub fn announce(inbound: &Inbound) {
    info!(inbound = %inbound.name(), target = %inbound.target, concurrency = inbound.concurrency,
          "receiving from JetStream");
}
