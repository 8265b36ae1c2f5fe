//! The checks at start: every queue, subject, stream and consumer the configuration names exists
//! and fits; streams and consumers the configuration describes are created when missing.

use bussig_client::QueueInfo;
use tracing::{info, warn};

use crate::bus::Bus;
use crate::config::{Config, Inbound, Target};
use crate::start::StartError;

/// Every route's queue, in route order, or the first that is missing.
pub(crate) async fn check_queues(bus: &Bus, config: &Config) -> Result<Vec<QueueInfo>, StartError> {
    let names: Vec<String> = config.routes.iter().map(|r| r.queue.clone()).collect();
    let found = bussig_client::queues(bus.client(), &names).await?;
    let mut queues = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let queue = found
            .iter()
            .find(|q| q.name == route.queue)
            .ok_or_else(|| StartError::UnknownQueue {
                index: i + 1,
                queue: route.queue.clone(),
            })?;
        let lock_timeout = route.lock_timeout.unwrap_or(queue.lock_timeout);
        if lock_timeout <= config.ack_timeout * 2 {
            return Err(StartError::LockTooShort {
                index: i + 1,
                queue: route.queue.clone(),
                lock_timeout,
                ack_timeout: config.ack_timeout,
            });
        }
        queues.push(queue.clone());
    }
    Ok(queues)
}

/// Every inbound route's queue must exist, and remember a dedup_id longer than NATS takes to
/// deliver a message again; a subject must be one bussig takes.
pub(crate) async fn check_inbound_targets(bus: &Bus, config: &Config) -> Result<(), StartError> {
    for (i, inbound) in config.inbound.iter().enumerate() {
        let (index, name) = (i + 1, inbound.name());
        match &inbound.target {
            Target::Queue(queue) => {
                let found = bussig_client::queues(bus.client(), &[queue]).await?;
                let Some(info) = found.first() else {
                    return Err(StartError::UnknownInboundQueue {
                        index,
                        name,
                        queue: queue.clone(),
                    });
                };
                if info.dedup_window < inbound.ack_wait * 2 {
                    warn!(inbound = %name, %queue, dedup_window = ?info.dedup_window, ack_wait = ?inbound.ack_wait,
                          "the queue's dedup_window is shorter than twice ack_wait: a message NATS \
                           delivers again after that may be stored twice");
                }
            }
            Target::Subject(subject) => {
                match bussig_client::subscribers(bus.client(), subject).await {
                    Ok(queues) if queues.is_empty() => {
                        warn!(inbound = %name, %subject, "no queue subscribes to the subject yet")
                    }
                    Ok(_) => {}
                    Err(bussig_client::Error::InvalidArgument(message)) => {
                        return Err(StartError::InboundSubject {
                            index,
                            name,
                            subject: subject.clone(),
                            message,
                        })
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        }
    }
    Ok(())
}

/// The durable consumer of each inbound route, created when missing (an existing one is used as
/// it is).
pub(crate) async fn inbound_consumers(
    jetstream: &async_nats::jetstream::Context,
    config: &Config,
) -> Result<Vec<async_nats::jetstream::consumer::PullConsumer>, StartError> {
    let mut consumers = Vec::new();
    for (i, inbound) in config.inbound.iter().enumerate() {
        let (index, name) = (i + 1, inbound.name());
        let stream = jetstream.get_stream(&inbound.stream).await.map_err(|_| {
            StartError::NoInboundStream {
                index,
                name: name.clone(),
                stream: inbound.stream.clone(),
            }
        })?;
        let consumer = stream
            .get_or_create_consumer(&inbound.consumer, consumer_config(inbound))
            .await
            .map_err(|e| StartError::Consumer {
                index,
                name: name.clone(),
                consumer: inbound.consumer.clone(),
                message: e.to_string(),
            })?;
        info!(inbound = %name, "consumer ready");
        consumers.push(consumer);
    }
    Ok(consumers)
}

fn consumer_config(inbound: &Inbound) -> async_nats::jetstream::consumer::pull::Config {
    async_nats::jetstream::consumer::pull::Config {
        durable_name: Some(inbound.consumer.clone()),
        filter_subject: inbound.filter_subject.clone().unwrap_or_default(),
        ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
        ack_wait: inbound.ack_wait,
        // Room for every worker's batch and the next one it pulls.
        max_ack_pending: i64::from(inbound.batch_size * inbound.concurrency * 2),
        ..Default::default()
    }
}

/// Asks the JetStream API for account information with a raw request: the client's typed
/// answer expects fields older servers do not send.
pub(crate) async fn check_jetstream(nats: &async_nats::Client) -> Result<(), String> {
    let reply = nats
        .request("$JS.API.INFO", Vec::new().into())
        .await
        .map_err(|e| e.to_string())?;
    let info: serde_json::Value =
        serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())?;
    match info.get("error") {
        Some(error) => Err(error.to_string()),
        None => Ok(()),
    }
}

/// Creates the configured streams that do not exist yet; existing ones are not changed.
pub(crate) async fn ensure_streams(
    jetstream: &async_nats::jetstream::Context,
    config: &Config,
) -> Result<(), StartError> {
    for wanted in &config.streams {
        let stream = jetstream
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: wanted.name.clone(),
                subjects: wanted.subjects.clone(),
                duplicate_window: wanted.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|e| StartError::StreamCreate {
                name: wanted.name.clone(),
                message: e.to_string(),
            })?;
        let subjects = &stream.cached_info().config.subjects;
        info!(stream = %wanted.name, ?subjects, "stream ready");
    }
    Ok(())
}

/// Each fixed subject must land in a stream whose duplicate window covers a re-send after a lock
/// runs out; a shorter window is allowed but warned about.
pub(crate) async fn check_streams(
    jetstream: &async_nats::jetstream::Context,
    config: &Config,
    queues: &[QueueInfo],
) -> Result<(), StartError> {
    for (i, (route, queue)) in config.routes.iter().zip(queues).enumerate() {
        let Some(subject) = &route.subject else {
            continue;
        };
        let name = match jetstream.stream_by_subject(subject.clone()).await {
            Ok(name) => name,
            Err(e)
                if e.kind()
                    == async_nats::jetstream::context::GetStreamByNameErrorKind::NotFound =>
            {
                return Err(StartError::NoStream {
                    index: i + 1,
                    queue: route.queue.clone(),
                    subject: subject.clone(),
                })
            }
            Err(e) => {
                return Err(StartError::StreamLookup {
                    subject: subject.clone(),
                    message: e.to_string(),
                })
            }
        };
        let mut stream =
            jetstream
                .get_stream(&name)
                .await
                .map_err(|e| StartError::StreamLookup {
                    subject: subject.clone(),
                    message: e.to_string(),
                })?;
        let window = stream
            .info()
            .await
            .map_err(|e| StartError::StreamLookup {
                subject: subject.clone(),
                message: e.to_string(),
            })?
            .config
            .duplicate_window;
        let lock_timeout = route.lock_timeout.unwrap_or(queue.lock_timeout);
        if window < lock_timeout * 2 {
            warn!(route = %route.queue, stream = %name, duplicate_window = ?window, ?lock_timeout,
                  "the stream's duplicate window is shorter than twice the lock timeout: a message \
                   re-sent after a crash may be stored twice");
        }
        info!(route = %route.queue, %subject, stream = %name, duplicate_window = ?window, "stream found");
    }
    Ok(())
}
