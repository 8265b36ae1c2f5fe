//! Starting the relay: check the configuration against the database and NATS, start the workers
//! of every route, serve HTTP, and stop them all when the shutdown future resolves.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use crate::bus::{Bus, ConnectError};
use crate::checks::{
    check_inbound_targets, check_jetstream, check_queues, check_streams, ensure_streams,
    inbound_consumers,
};
use crate::config::{redact, Config, ConfigError, Inbound};
use crate::http;
use crate::inbound::{self, InboundWorker};
use crate::metrics::Metrics;
use crate::relay::{Shared, Worker};

const LAG_INTERVAL: Duration = Duration::from_secs(5);
const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum StartError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Database(#[from] bussig_client::Error),
    #[error(
        "route {index}: queue `{queue}` does not exist in the database; create it with \
         SELECT bussig.create_queue('{queue}') or fix the route"
    )]
    UnknownQueue { index: usize, queue: String },
    #[error(
        "route {index} (queue `{queue}`): lock timeout {lock_timeout:?} must be more than twice \
         ack_timeout {ack_timeout:?}"
    )]
    LockTooShort {
        index: usize,
        queue: String,
        lock_timeout: Duration,
        ack_timeout: Duration,
    },
    #[error("cannot connect to NATS at {url}: {message}")]
    Nats { url: String, message: String },
    #[error("NATS at {url} has no JetStream (start nats-server with -js): {message}")]
    NoJetStream { url: String, message: String },
    #[error(
        "route {index} (queue `{queue}`): no JetStream stream captures subject `{subject}`; \
         create one, or change `subject`"
    )]
    NoStream {
        index: usize,
        queue: String,
        subject: String,
    },
    #[error("cannot create stream `{name}`: {message}")]
    StreamCreate { name: String, message: String },
    #[error("cannot look up the stream for subject `{subject}`: {message}")]
    StreamLookup { subject: String, message: String },
    #[error(
        "inbound {index} ({name}): queue `{queue}` does not exist in the database; create it with \
         SELECT bussig.create_queue('{queue}') or fix the route"
    )]
    UnknownInboundQueue {
        index: usize,
        name: String,
        queue: String,
    },
    #[error("inbound {index} ({name}): subject `{subject}`: {message}")]
    InboundSubject {
        index: usize,
        name: String,
        subject: String,
        message: String,
    },
    #[error(
        "inbound {index} ({name}): no JetStream stream `{stream}`; create it, or fix `stream`"
    )]
    NoInboundStream {
        index: usize,
        name: String,
        stream: String,
    },
    #[error("inbound {index} ({name}): cannot get or create consumer `{consumer}`: {message}")]
    Consumer {
        index: usize,
        name: String,
        consumer: String,
        message: String,
    },
    #[error("cannot listen on metrics_address {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    /// A route's or inbound's worker ended before the relay was told to stop: a bug. The relay stops
    /// the others (within the shutdown timeout) and exits 1, for its supervisor to start it again,
    /// rather than go on relaying without it while /ready says all is well.
    #[error("a relay worker ended before the shutdown: {0}")]
    WorkerEnded(String),
}

impl StartError {
    /// 2 for a configuration that cannot work, 1 for a server that cannot be reached.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Usage(_)
            | StartError::Config(_)
            | StartError::UnknownQueue { .. }
            | StartError::LockTooShort { .. }
            | StartError::NoStream { .. }
            | StartError::StreamCreate { .. }
            | StartError::UnknownInboundQueue { .. }
            | StartError::InboundSubject { .. }
            | StartError::NoInboundStream { .. }
            | StartError::Consumer { .. } => 2,
            StartError::Connect(ConnectError::Url(_)) => 2,
            _ => 1,
        }
    }
}

/// Checks the configuration against the servers, then relays until `stop_when` resolves; with
/// `check_only`, stops after the checks. Batches in flight at shutdown are finished or given back
/// within `shutdown_timeout`.
pub async fn run(
    config: Arc<Config>,
    check_only: bool,
    stop_when: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let bus = Bus::connect(&config.database_url, Duration::from_secs(30)).await?;
    let queues = check_queues(&bus, &config).await?;
    check_inbound_targets(&bus, &config).await?;
    info!(database = %redact(&config.database_url), routes = config.routes.len(), "database checked");

    let nats = async_nats::ConnectOptions::new()
        .name("bussig-relay")
        .connection_timeout(NATS_CONNECT_TIMEOUT)
        .max_reconnects(None)
        // The client logs every event itself; a lost server deserves a warning.
        .event_callback(|event| async move {
            if let async_nats::Event::Disconnected = event {
                warn!("NATS disconnected; publishes are held until it reconnects");
            }
        })
        .connect(config.nats_url.as_str())
        .await
        .map_err(|e| StartError::Nats {
            url: redact(&config.nats_url),
            message: e.to_string(),
        })?;
    let jetstream = async_nats::jetstream::ContextBuilder::new()
        .timeout(config.ack_timeout)
        .backpressure_on_inflight(true)
        .build(nats.clone());
    check_jetstream(&nats)
        .await
        .map_err(|message| StartError::NoJetStream {
            url: redact(&config.nats_url),
            message,
        })?;
    ensure_streams(&jetstream, &config).await?;
    check_streams(&jetstream, &config, &queues).await?;
    let consumers = inbound_consumers(&jetstream, &config).await?;
    if check_only {
        println!(
            "configuration OK: {} route(s), {} inbound",
            config.routes.len(),
            config.inbound.len()
        );
        return Ok(());
    }

    let listener = TcpListener::bind(config.metrics_address)
        .await
        .map_err(|source| StartError::Listen {
            address: config.metrics_address.to_string(),
            source,
        })?;
    let metrics = Arc::new(Metrics::new(
        config.routes.iter().map(|r| r.queue.clone()),
        config.inbound.iter().map(Inbound::name),
    ));
    let status = Arc::new(http::Status {
        metrics: metrics.clone(),
        nats: nats.clone(),
        database_url: config.database_url.clone(),
        database: Mutex::new(Some(bus)),
        stopping: false.into(),
    });
    tokio::spawn(http::serve(listener, status.clone()));
    let lag_status = status.clone();
    tokio::spawn(async move {
        loop {
            lag_status.refresh_lag().await;
            lag_status.nats_connected();
            tokio::time::sleep(LAG_INTERVAL).await;
        }
    });

    let (stop, shutdown) = watch::channel(false);
    let shared = Arc::new(Shared {
        config: config.clone(),
        jetstream,
    });
    let mut workers = tokio::task::JoinSet::new();
    for (route, queue) in config.routes.iter().zip(&queues) {
        for _ in 0..route.concurrency {
            workers.spawn(
                Worker {
                    route: route.clone(),
                    queue: queue.clone(),
                    shared: shared.clone(),
                    metrics: metrics.route(&route.queue),
                    shutdown: shutdown.clone(),
                    interrupted: Vec::new(),
                }
                .run(),
            );
        }
    }
    for (inbound, consumer) in config.inbound.iter().zip(consumers) {
        inbound::announce(inbound);
        for _ in 0..inbound.concurrency {
            workers.spawn(
                InboundWorker {
                    inbound: inbound.clone(),
                    consumer: consumer.clone(),
                    database_url: config.database_url.clone(),
                    metrics: metrics.inbound(&inbound.name()),
                    shutdown: shutdown.clone(),
                }
                .run(),
            );
        }
    }
    info!(metrics_address = %config.metrics_address, nats = %redact(&config.nats_url), "relaying");

    tokio::pin!(stop_when);
    let ended = tokio::select! {
        _ = &mut stop_when => None,
        Some(outcome) = workers.join_next() => Some(match outcome {
            Ok(()) => "it returned".to_string(),
            Err(error) if error.is_panic() => panic_message(error.into_panic()),
            Err(error) => error.to_string(),
        }),
    };
    if let Some(why) = &ended {
        tracing::error!(%why, "a relay worker ended before the shutdown; stopping the relay");
    }
    info!("shutting down: finishing or releasing batches in flight");
    status.stopping.store(true, Ordering::Relaxed);
    let _ = stop.send(true);
    let finished = tokio::time::timeout(config.shutdown_timeout, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(timeout = ?config.shutdown_timeout,
              "batches still in flight at the shutdown timeout; their locks will lapse and bussig redelivers them");
    }
    // Bounded: with NATS away, a flush would wait for the reconnect.
    let _ = tokio::time::timeout(Duration::from_secs(2), nats.flush()).await;
    info!("stopped");
    match ended {
        Some(why) => Err(StartError::WorkerEnded(why)),
        None => Ok(()),
    }
}

/// What a panic said, when it said it with a string.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => format!("panicked: {message}"),
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(message) => format!("panicked: {message}"),
            Err(_) => "panicked".to_string(),
        },
    }
}
