//! bussig-relay: moves messages from bussig queues to NATS JetStream (`[[route]]`, see `relay.rs`)
//! and from JetStream consumers into bussig (`[[inbound]]`, see `inbound.rs`), each landing exactly
//! once. Every bussig call goes through `bussig-client`.
//!
//! Exit status: 0 after a clean shutdown (or `--check` passing), 1 when a server cannot be reached
//! at start, 2 when the configuration is wrong or does not fit the servers it names.

mod bus;
mod config;
mod http;
mod inbound;
mod incoming;
mod metrics;
mod publish;
mod relay;
mod subject;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Mutex};
use tracing::{error, info, warn};

use bussig_client::QueueInfo;

use crate::bus::{Bus, ConnectError};
use crate::config::{redact, Config, ConfigError, Inbound, LogFormat, Target};
use crate::inbound::InboundWorker;
use crate::metrics::Metrics;
use crate::relay::{Shared, Worker};

const CONFIG_ENV: &str = "BUSSIG_RELAY_CONFIG";
const DEFAULT_CONFIG: &str = "bussig-relay.toml";
const LAG_INTERVAL: Duration = Duration::from_secs(5);
const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: bussig-relay [--config FILE] [--check]

Moves messages from bussig queues to NATS JetStream and from JetStream consumers into bussig
(see the README's \"Relay to NATS JetStream\").

  --config FILE   the TOML configuration (default: $BUSSIG_RELAY_CONFIG, else bussig-relay.toml)
  --check         check the configuration, the queues and the streams, then exit
  --version       print the version

Environment: DATABASE_URL, NATS_URL and BUSSIG_RELAY_METRICS_ADDRESS override the file;
RUST_LOG sets the log level (default info).";

#[derive(Debug, Error)]
enum StartError {
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
}

impl StartError {
    fn exit_code(&self) -> u8 {
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

struct Arguments {
    config: PathBuf,
    check: bool,
}

/// None when the arguments asked for help or the version, which are printed here.
fn parse_arguments() -> Result<Option<Arguments>, StartError> {
    let mut config = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
    let mut check = false;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--config" | "-c") => {
                let path = args.next().ok_or_else(|| {
                    StartError::Usage(format!("--config needs a file\n\n{USAGE}"))
                })?;
                config = Some(PathBuf::from(path));
            }
            Some("--check") => check = true,
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return Ok(None);
            }
            Some("--version" | "-V") => {
                println!("bussig-relay {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            _ => {
                return Err(StartError::Usage(format!(
                    "unknown argument {}\n\n{USAGE}",
                    arg.to_string_lossy()
                )))
            }
        }
    }
    Ok(Some(Arguments {
        config: config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG)),
        check,
    }))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Every route's queue, in route order, or the first that is missing.
async fn check_queues(bus: &Bus, config: &Config) -> Result<Vec<QueueInfo>, StartError> {
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
async fn check_inbound_targets(bus: &Bus, config: &Config) -> Result<(), StartError> {
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
async fn inbound_consumers(
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
async fn check_jetstream(nats: &async_nats::Client) -> Result<(), String> {
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
async fn ensure_streams(
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
async fn check_streams(
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

async fn start(arguments: Arguments) -> Result<(), StartError> {
    let config = Config::load(&arguments.config, |name| std::env::var(name).ok())?;
    init_logging(config.log_format);
    let config = Arc::new(config);

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
    if arguments.check {
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

    let mut terminate = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let received = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    info!(
        signal = received,
        "shutting down: finishing or releasing batches in flight"
    );
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
    Ok(())
}

fn main() -> ExitCode {
    let arguments = match parse_arguments() {
        Ok(Some(arguments)) => arguments,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bussig-relay: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    match runtime.block_on(start(arguments)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "cannot start");
            eprintln!("bussig-relay: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
