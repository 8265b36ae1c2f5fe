//! The JetStream side: a bussig delivery as a NATS message, and what became of its publish.

use std::error::Error as _;
use std::str::FromStr;

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::ErrorCode;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use thiserror::Error;

use crate::bus::Delivery;

pub const CORRELATION_ID_HEADER: &str = "Bussig-Correlation-Id";
pub const REPLY_TO_HEADER: &str = "Bussig-Reply-To";
pub const QUEUE_HEADER: &str = "Bussig-Queue";
pub const MESSAGE_ID_HEADER: &str = "Bussig-Message-Id";
pub const SUBJECT_HEADER: &str = "Bussig-Subject";
pub const GROUP_ID_HEADER: &str = "Bussig-Group-Id";

/// Why a delivery cannot become a NATS message at all; retrying would not help.
#[derive(Debug, Error)]
pub enum Unpublishable {
    #[error("the message has no subject and the route has no `subject` for such messages")]
    NoSubject,
    #[error("header `{0}` is not a valid NATS header name")]
    HeaderName(String),
    #[error("header `{0}` has a value NATS headers cannot carry (a line break)")]
    HeaderValue(String),
}

/// The id JetStream de-duplicates on: the same for every re-send of one bussig message.
pub fn message_id(prefix: &str, queue: &str, id: i64) -> String {
    format!("{prefix}{queue}:{id}")
}

fn header_value(name: &str, value: &str) -> Result<HeaderValue, Unpublishable> {
    HeaderValue::from_str(value).map_err(|_| Unpublishable::HeaderValue(name.to_string()))
}

/// The message to publish: subject, payload as JSON text, headers.
pub struct Outgoing {
    pub subject: String,
    pub payload: Vec<u8>,
    pub headers: HeaderMap,
}

impl Outgoing {
    fn publish(&self) -> PublishMessage {
        PublishMessage::build()
            .payload(self.payload.clone().into())
            .headers(self.headers.clone())
    }
}

pub fn build(
    delivery: &Delivery,
    queue: &str,
    subject: Option<String>,
    message_id_prefix: &str,
) -> Result<Outgoing, Unpublishable> {
    let subject = subject.ok_or(Unpublishable::NoSubject)?;
    let mut headers = HeaderMap::new();
    if let Some(Value::Object(user)) = &delivery.headers {
        for (name, value) in user {
            let header =
                HeaderName::from_str(name).map_err(|_| Unpublishable::HeaderName(name.clone()))?;
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            headers.insert(header, header_value(name, &text)?);
        }
    }
    if let Some(correlation_id) = &delivery.correlation_id {
        headers.insert(
            CORRELATION_ID_HEADER,
            header_value(CORRELATION_ID_HEADER, correlation_id)?,
        );
    }
    if let Some(reply_to) = &delivery.reply_to {
        headers.insert(REPLY_TO_HEADER, header_value(REPLY_TO_HEADER, reply_to)?);
    }
    if let Some(own) = &delivery.subject {
        headers.insert(SUBJECT_HEADER, header_value(SUBJECT_HEADER, own)?);
    }
    if let Some(group) = &delivery.group_id {
        headers.insert(GROUP_ID_HEADER, header_value(GROUP_ID_HEADER, group)?);
    }
    headers.insert(QUEUE_HEADER, header_value(QUEUE_HEADER, queue)?);
    headers.insert(MESSAGE_ID_HEADER, delivery.id.to_string().as_str());
    // Set last, so a user header of the same name cannot defeat de-duplication.
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        header_value(
            "Nats-Msg-Id",
            &message_id(message_id_prefix, queue, delivery.id),
        )?,
    );
    let payload = serde_json::to_vec(&delivery.payload).expect("a JSON value always serialises");
    Ok(Outgoing {
        subject,
        payload,
        headers,
    })
}

/// What became of one publish.
#[derive(Debug)]
pub enum Outcome {
    /// Stored; `duplicate` when JetStream already had it (a re-send it removed).
    Stored { duplicate: bool },
    /// JetStream answered and refused it: retrying the same way is likely to fail again.
    Rejected(String),
    /// No answer: NATS is unreachable or slow. Safe to re-send, JetStream removes duplicates.
    Unavailable(String),
    /// "No responders": no stream captures the subject, or none answers for a moment (a JetStream
    /// node restarting, a stream electing its leader). Held a few times, then a rejection.
    NoResponders(String),
}

impl Outcome {
    pub fn of(result: Result<async_nats::jetstream::publish::PublishAck, PublishError>) -> Outcome {
        match result {
            Ok(ack) => Outcome::Stored {
                duplicate: ack.duplicate,
            },
            Err(error) => classify(error),
        }
    }
}

fn classify(error: PublishError) -> Outcome {
    let text = error.to_string();
    match error.kind() {
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => Outcome::Rejected(text),
        // What the client reports as no stream.
        PublishErrorKind::StreamNotFound => Outcome::NoResponders(text),
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => Outcome::Unavailable(text),
        // An API error in the PubAck is JetStream's answer, but for a cluster not available now;
        // a reply that is no PubAck at all (a service answering on the subject) is an answer too.
        // Anything else is on the way there.
        PublishErrorKind::Other => {
            let source = error.source();
            let api = source.and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
            match api {
                Some(api) if api.error_code() == ErrorCode::CLUSTER_NOT_AVAILABLE => {
                    Outcome::Unavailable(text)
                }
                Some(_) => Outcome::Rejected(text),
                None if source.is_some_and(|s| s.is::<serde_json::Error>()) => {
                    Outcome::Rejected(text)
                }
                None => Outcome::Unavailable(text),
            }
        }
    }
}

/// Sends a publish and waits for its PubAck, all within `ack_timeout`; nothing is sent while NATS
/// is not `connected` (Unavailable at once).
pub async fn confirmed(
    context: &async_nats::jetstream::Context,
    outgoing: &Outgoing,
    connected: bool,
    ack_timeout: std::time::Duration,
) -> Outcome {
    if !connected {
        return Outcome::Unavailable("NATS is not connected".into());
    }
    let published = async {
        match send(context, outgoing).await {
            Ok(ack) => Outcome::of(ack.await),
            Err(outcome) => outcome,
        }
    };
    tokio::time::timeout(ack_timeout, published)
        .await
        .unwrap_or_else(|_| Outcome::Unavailable(format!("no PubAck within {ack_timeout:?}")))
}

/// Sends a publish; the returned future yields its outcome once the PubAck (or its absence) is known.
async fn send(
    context: &async_nats::jetstream::Context,
    outgoing: &Outgoing,
) -> Result<PublishAckFuture, Outcome> {
    context
        .send_publish(outgoing.subject.clone(), outgoing.publish())
        .await
        .map_err(classify)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    fn delivery(headers: Option<Value>) -> Delivery {
        let mut delivery = Delivery::new("orders", 42, Uuid::nil(), json!({"order": 1}));
        delivery.subject = Some("orders.eu".to_string());
        delivery.headers = headers;
        delivery.correlation_id = Some("c-1".to_string());
        delivery.reply_to = Some("replies".to_string());
        delivery.group_id = Some("order-7".to_string());
        delivery
    }

    #[test]
    fn message_ids_name_queue_and_message() {
        assert_eq!(message_id("", "orders", 42), "orders:42");
        assert_eq!(message_id("db1:", "orders", 42), "db1:orders:42");
    }

    #[test]
    fn headers_carry_user_headers_and_bussig_fields() {
        let d = delivery(Some(
            json!({"tenant": "acme", "attempt": 3, "Nats-Msg-Id": "forged"}),
        ));
        let out = build(&d, "orders", Some("prod.orders.eu".to_string()), "").unwrap();
        assert_eq!(out.subject, "prod.orders.eu");
        let get = |name: &str| out.headers.get(name).map(|v| v.as_str().to_string());
        assert_eq!(get("tenant").as_deref(), Some("acme"));
        assert_eq!(get("attempt").as_deref(), Some("3"));
        assert_eq!(get(CORRELATION_ID_HEADER).as_deref(), Some("c-1"));
        assert_eq!(get(REPLY_TO_HEADER).as_deref(), Some("replies"));
        assert_eq!(get(SUBJECT_HEADER).as_deref(), Some("orders.eu"));
        assert_eq!(get(QUEUE_HEADER).as_deref(), Some("orders"));
        assert_eq!(get(GROUP_ID_HEADER).as_deref(), Some("order-7"));
        assert_eq!(get("Nats-Msg-Id").as_deref(), Some("orders:42"));
        assert_eq!(out.payload, br#"{"order":1}"#);
    }

    #[test]
    fn unpublishable_messages_say_why() {
        let d = delivery(None);
        assert!(matches!(
            build(&d, "q", None, ""),
            Err(Unpublishable::NoSubject)
        ));
        let d = delivery(Some(json!({"bad name": "x"})));
        assert!(matches!(
            build(&d, "q", Some("s".into()), ""),
            Err(Unpublishable::HeaderName(_))
        ));
        let d = delivery(Some(json!({"ok": "line\nbreak"})));
        assert!(matches!(
            build(&d, "q", Some("s".into()), ""),
            Err(Unpublishable::HeaderValue(_))
        ));
    }
}
