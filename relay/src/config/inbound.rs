//! `[[inbound]]`: a JetStream consumer whose messages the relay stores in bussig, in a queue or
//! published on a subject.

use std::time::Duration;

use serde::Deserialize;

use super::{duration_or, positive, ConfigError, DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE};
use crate::subject;

const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// The header the outbound relay writes a message's group in, so a round trip keeps the group.
const DEFAULT_GROUP_ID_HEADER: &str = "Bussig-Group-Id";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileInbound {
    stream: String,
    consumer: String,
    filter_subject: Option<String>,
    queue: Option<String>,
    subject: Option<String>,
    batch_size: Option<u32>,
    concurrency: Option<u32>,
    ack_wait: Option<String>,
    group_id_header: Option<String>,
}

/// Where the messages of an inbound route go in bussig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `bussig.send` to this queue.
    Queue(String),
    /// `bussig.publish` on this subject, to every queue subscribed to it.
    Subject(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Queue(queue) => write!(f, "queue `{queue}`"),
            Target::Subject(subject) => write!(f, "subject `{subject}`"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Inbound {
    pub stream: String,
    /// The durable pull consumer's name; the relay creates it when it does not exist.
    pub consumer: String,
    /// Only these subjects of the stream, when the relay creates the consumer.
    pub filter_subject: Option<String>,
    pub target: Target,
    /// Messages stored in one bussig transaction at most.
    pub batch_size: u32,
    /// Batches in flight at once in one relay.
    pub concurrency: u32,
    /// How long NATS waits for an ack before it delivers again, when the relay creates the consumer.
    pub ack_wait: Duration,
    /// The NATS header whose value becomes the bussig message's `group_id`; None for no groups.
    pub group_id_header: Option<String>,
}

impl Inbound {
    /// How the route is named in logs, metrics and errors.
    pub fn name(&self) -> String {
        format!("{}/{}", self.stream, self.consumer)
    }

    pub(super) fn check(index: usize, file: FileInbound) -> Result<Inbound, ConfigError> {
        let invalid = |message: String| ConfigError::Inbound {
            index,
            name: format!("{}/{}", file.stream, file.consumer),
            message,
        };
        check_name(&file.stream).map_err(|m| invalid(format!("`stream`: {m}")))?;
        check_name(&file.consumer).map_err(|m| invalid(format!("`consumer`: {m}")))?;
        if let Some(filter) = &file.filter_subject {
            subject::check_pattern(filter).map_err(|e| invalid(e.to_string()))?;
        }
        let target = match (&file.queue, &file.subject) {
            (Some(queue), None) if !queue.trim().is_empty() => Target::Queue(queue.clone()),
            (None, Some(subject)) => {
                subject::check_subject(subject).map_err(|e| invalid(e.to_string()))?;
                Target::Subject(subject.clone())
            }
            _ => {
                return Err(invalid(
                    "give `queue` (send to it) or `subject` (publish on it), one of them".into(),
                ))
            }
        };
        let batch_size = file.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
        if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
            return Err(invalid(format!(
                "batch_size {batch_size} is outside 1..={MAX_BATCH_SIZE}"
            )));
        }
        let concurrency = file.concurrency.unwrap_or(1);
        if concurrency == 0 {
            return Err(invalid("concurrency must be at least 1".into()));
        }
        let ack_wait = positive(
            "ack_wait",
            duration_or("ack_wait", file.ack_wait.as_deref(), DEFAULT_ACK_WAIT)?,
        )?;
        let group_id_header = match file.group_id_header.as_deref() {
            None => Some(DEFAULT_GROUP_ID_HEADER.to_string()),
            Some("") => None,
            Some(name) => {
                check_header_name(name).map_err(|m| invalid(format!("`group_id_header`: {m}")))?;
                Some(name.to_string())
            }
        };
        Ok(Inbound {
            stream: file.stream,
            consumer: file.consumer,
            filter_subject: file.filter_subject,
            target,
            batch_size,
            concurrency,
            ack_wait,
            group_id_header,
        })
    }
}

/// JetStream puts stream and consumer names in subjects and file names.
pub(super) fn check_name(name: &str) -> Result<(), String> {
    let bad = name.is_empty()
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c));
    if bad {
        return Err(
            "a name must be non-empty, without whitespace, `.`, `*`, `>`, `/` or `\\`".into(),
        );
    }
    Ok(())
}

/// A NATS header name: printable ASCII without `:` or spaces.
fn check_header_name(name: &str) -> Result<(), String> {
    if name.chars().any(|c| !c.is_ascii_graphic() || c == ':') {
        return Err(
            "a header name is printable ASCII without `:` or spaces (\"\" for none)".into(),
        );
    }
    Ok(())
}
