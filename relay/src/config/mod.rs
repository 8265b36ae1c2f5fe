//! The relay's configuration: a TOML file, with the environment overriding addresses and secrets.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::subject::{self, Mapping, SubjectError};

mod inbound;
pub use inbound::{Inbound, Target};

/// Environment variables that override the file, so secrets need not be written in it.
pub const DATABASE_URL_ENV: &str = "DATABASE_URL";
pub const NATS_URL_ENV: &str = "NATS_URL";
pub const METRICS_ADDRESS_ENV: &str = "BUSSIG_RELAY_METRICS_ADDRESS";

const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9464";
const DEFAULT_BATCH_SIZE: u32 = 100;
/// bussig.read accepts at most this many messages at once.
const MAX_BATCH_SIZE: u32 = 1000;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error(
        "no database given: set `database_url` in the configuration file or {DATABASE_URL_ENV}"
    )]
    NoDatabase,
    #[error("the configuration has no [[route]] and no [[inbound]]: nothing to relay")]
    NoRoutes,
    #[error("route {index} (queue `{queue}`): {message}")]
    Route {
        index: usize,
        queue: String,
        message: String,
    },
    #[error("route {index} (queue `{queue}`): {source}")]
    Subject {
        index: usize,
        queue: String,
        source: Box<SubjectError>,
    },
    #[error("queue `{0}` has more than one route: give each queue one route")]
    DuplicateQueue(String),
    #[error("`{name}` = \"{value}\" is not a duration: write a number and a unit, e.g. \"500ms\", \"30s\", \"5m\"")]
    Duration { name: String, value: String },
    #[error("`{name}`: {message}")]
    Invalid { name: String, message: String },
    #[error("stream `{name}`: {message}")]
    Stream { name: String, message: String },
    #[error("inbound {index} ({name}): {message}")]
    Inbound {
        index: usize,
        name: String,
        message: String,
    },
    #[error("consumer `{0}` has more than one [[inbound]]: give each consumer one")]
    DuplicateConsumer(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    nats_url: Option<String>,
    metrics_address: Option<String>,
    #[serde(default)]
    message_id_prefix: String,
    ack_timeout: Option<String>,
    poll_wait: Option<String>,
    shutdown_timeout: Option<String>,
    batch_size: Option<u32>,
    lock_timeout: Option<String>,
    #[serde(default)]
    log_format: LogFormat,
    #[serde(default, rename = "route")]
    routes: Vec<FileRoute>,
    #[serde(default, rename = "stream")]
    streams: Vec<FileStream>,
    #[serde(default)]
    inbound: Vec<inbound::FileInbound>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStream {
    name: String,
    subjects: Vec<String>,
    duplicate_window: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    queue: String,
    subject: Option<String>,
    #[serde(default)]
    map: Vec<FileMapping>,
    #[serde(default)]
    ordered: bool,
    batch_size: Option<u32>,
    lock_timeout: Option<String>,
    concurrency: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMapping {
    from: String,
    to: String,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

/// Everything checked, defaults applied.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub nats_url: String,
    pub metrics_address: SocketAddr,
    /// Put in front of every Nats-Msg-Id, for several databases feeding one stream.
    pub message_id_prefix: String,
    /// How long to wait for one PubAck before the publish counts as failed.
    pub ack_timeout: Duration,
    /// How long one read waits for messages before it asks again.
    pub poll_wait: Duration,
    /// How long a SIGTERM waits for batches in flight before the relay exits anyway.
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    pub routes: Vec<Route>,
    pub streams: Vec<Stream>,
    /// JetStream consumers whose messages go into bussig.
    pub inbound: Vec<Inbound>,
}

/// A stream the relay creates at start when it does not exist; an existing one is left as it is.
#[derive(Debug, Clone)]
pub struct Stream {
    pub name: String,
    pub subjects: Vec<String>,
    pub duplicate_window: Duration,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub queue: String,
    /// Where a message without a subject of its own goes.
    pub subject: Option<String>,
    /// Applied to a message's own subject; the first that matches wins, none keeps it as it is.
    pub mappings: Vec<Mapping>,
    pub ordered: bool,
    pub batch_size: u32,
    /// None: the queue's own lock timeout.
    pub lock_timeout: Option<Duration>,
    /// Batches in flight at once for this queue in one relay; always 1 when ordered.
    pub concurrency: u32,
}

impl Route {
    /// The subject a message is published on, or None when it cannot be routed.
    pub fn target_subject(&self, own_subject: Option<&str>) -> Option<String> {
        match own_subject {
            Some(own) => Some(
                self.mappings
                    .iter()
                    .find_map(|m| m.apply(own))
                    .unwrap_or_else(|| own.to_string()),
            ),
            None => self.subject.clone(),
        }
    }
}

/// "500ms", "30s", "5m", "1h", "1.5s".
pub fn parse_duration(name: &str, value: &str) -> Result<Duration, ConfigError> {
    let invalid = || ConfigError::Duration {
        name: name.to_string(),
        value: value.to_string(),
    };
    let text = value.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(invalid)?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "s" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(invalid()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| invalid())
}

fn duration_or(
    name: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    value.map_or(Ok(default), |v| parse_duration(name, v))
}

fn positive(name: &str, value: Duration) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::Invalid {
            name: name.to_string(),
            message: "must be more than zero".to_string(),
        });
    }
    Ok(value)
}

impl Config {
    /// Reads `path` and applies the environment (a function, so tests need not change the process's).
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Config::parse(&shown, &text, env)
    }

    pub fn parse(
        path: &str,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let non_empty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let database_url = non_empty(env(DATABASE_URL_ENV))
            .or(non_empty(file.database_url))
            .ok_or(ConfigError::NoDatabase)?;
        let nats_url = non_empty(env(NATS_URL_ENV))
            .or(non_empty(file.nats_url))
            .unwrap_or_else(|| DEFAULT_NATS_URL.to_string());
        let metrics_text = non_empty(env(METRICS_ADDRESS_ENV))
            .or(file.metrics_address)
            .unwrap_or_else(|| DEFAULT_METRICS_ADDRESS.to_string());
        let metrics_address = metrics_text.parse().map_err(|_| ConfigError::Invalid {
            name: "metrics_address".to_string(),
            message: format!("`{metrics_text}` is not an address and port such as 127.0.0.1:9464"),
        })?;
        let ack_timeout = positive(
            "ack_timeout",
            duration_or(
                "ack_timeout",
                file.ack_timeout.as_deref(),
                Duration::from_secs(5),
            )?,
        )?;
        let poll_wait = duration_or(
            "poll_wait",
            file.poll_wait.as_deref(),
            Duration::from_secs(10),
        )?;
        // A read that returns at once on an idle queue would turn the relay into a busy loop.
        if poll_wait < Duration::from_millis(100) {
            return Err(ConfigError::Invalid {
                name: "poll_wait".to_string(),
                message: "must be at least 100ms".to_string(),
            });
        }
        let shutdown_timeout = duration_or(
            "shutdown_timeout",
            file.shutdown_timeout.as_deref(),
            Duration::from_secs(30),
        )?;
        let default_lock_timeout = file
            .lock_timeout
            .as_deref()
            .map(|v| parse_duration("lock_timeout", v))
            .transpose()?;
        if file.message_id_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid {
                name: "message_id_prefix".to_string(),
                message: "must not contain whitespace".to_string(),
            });
        }
        if file.routes.is_empty() && file.inbound.is_empty() {
            return Err(ConfigError::NoRoutes);
        }

        let mut seen = HashSet::new();
        let mut routes = Vec::new();
        for (i, route) in file.routes.into_iter().enumerate() {
            let index = i + 1;
            let queue = route.queue.clone();
            let route_error = |message: String| ConfigError::Route {
                index,
                queue: queue.clone(),
                message,
            };
            let subject_error = |source| ConfigError::Subject {
                index,
                queue: queue.clone(),
                source: Box::new(source),
            };
            if queue.trim().is_empty() {
                return Err(route_error("`queue` is empty".to_string()));
            }
            if !seen.insert(queue.clone()) {
                return Err(ConfigError::DuplicateQueue(queue));
            }
            if let Some(subject) = &route.subject {
                subject::check_subject(subject).map_err(subject_error)?;
            }
            let mappings = route
                .map
                .iter()
                .map(|m| Mapping::new(&m.from, &m.to))
                .collect::<Result<Vec<_>, _>>()
                .map_err(subject_error)?;
            let batch_size = route
                .batch_size
                .or(file.batch_size)
                .unwrap_or(DEFAULT_BATCH_SIZE);
            if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
                return Err(route_error(format!(
                    "batch_size {batch_size} is outside 1..={MAX_BATCH_SIZE}"
                )));
            }
            let lock_timeout = match route.lock_timeout.as_deref() {
                Some(v) => Some(
                    parse_duration("lock_timeout", v).map_err(|e| route_error(e.to_string()))?,
                ),
                None => default_lock_timeout,
            };
            if let Some(lock) = lock_timeout {
                if lock <= ack_timeout * 2 {
                    return Err(route_error(format!(
                        "lock_timeout {lock:?} must be more than twice ack_timeout {ack_timeout:?}, \
                         or messages could be unlocked while their PubAck is still awaited"
                    )));
                }
            }
            let concurrency = route.concurrency.unwrap_or(1);
            if concurrency == 0 {
                return Err(route_error("concurrency must be at least 1".to_string()));
            }
            if route.ordered && concurrency > 1 {
                return Err(route_error(
                    "an ordered route has one batch in flight: remove `concurrency` or set it to 1"
                        .to_string(),
                ));
            }
            routes.push(Route {
                queue,
                subject: route.subject,
                mappings,
                ordered: route.ordered,
                batch_size,
                lock_timeout,
                concurrency,
            });
        }

        let streams = file
            .streams
            .into_iter()
            .map(Stream::check)
            .collect::<Result<Vec<_>, _>>()?;

        let inbound = file
            .inbound
            .into_iter()
            .enumerate()
            .map(|(i, inbound)| Inbound::check(i + 1, inbound))
            .collect::<Result<Vec<_>, _>>()?;
        let mut consumers = HashSet::new();
        if let Some(twice) = inbound.iter().find(|i| !consumers.insert(i.name())) {
            return Err(ConfigError::DuplicateConsumer(twice.name()));
        }

        Ok(Config {
            database_url,
            nats_url,
            metrics_address,
            message_id_prefix: file.message_id_prefix,
            ack_timeout,
            poll_wait,
            shutdown_timeout,
            log_format: file.log_format,
            routes,
            streams,
            inbound,
        })
    }
}

impl Stream {
    fn check(file: FileStream) -> Result<Stream, ConfigError> {
        let invalid = |message: String| ConfigError::Stream {
            name: file.name.clone(),
            message,
        };
        inbound::check_name(&file.name).map_err(|m| invalid(format!("stream name: {m}")))?;
        if file.subjects.is_empty() {
            return Err(invalid("`subjects` is empty".to_string()));
        }
        for subject in &file.subjects {
            subject::check_pattern(subject).map_err(|e| invalid(e.to_string()))?;
        }
        let duplicate_window = duration_or(
            "duplicate_window",
            file.duplicate_window.as_deref(),
            Duration::from_secs(120),
        )?;
        Ok(Stream {
            name: file.name,
            subjects: file.subjects,
            duplicate_window,
        })
    }
}

/// A connection string with its password hidden, for logs and error messages.
pub fn redact(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                return format!(
                    "{}://{}:***{}",
                    &url[..scheme_end],
                    &rest[..colon],
                    &rest[at..]
                );
            }
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests;
