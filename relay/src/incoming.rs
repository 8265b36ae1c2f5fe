//! The NATS side of an inbound route: a JetStream message as a bussig send. Its `dedup_id` is the
//! same for every redelivery of the message, so bussig keeps the first and drops the others.

use async_nats::header::NATS_MESSAGE_ID;
use bussig_client::SendOptions;
use serde_json::Value;
use thiserror::Error;

use crate::publish::{CORRELATION_ID_HEADER, REPLY_TO_HEADER};

/// Headers the relay adds to say where a message came from.
pub const STREAM_HEADER: &str = "Nats-Stream";
pub const SEQUENCE_HEADER: &str = "Nats-Sequence";
pub const SUBJECT_HEADER: &str = "Nats-Subject";

/// Why a NATS message cannot become a bussig message at all; redelivering it would not help.
#[derive(Debug, Error)]
pub enum Unstorable {
    #[error("the payload is neither JSON nor UTF-8 text")]
    NotText,
}

/// A bussig message to send: its payload and its options (dedup_id, headers, correlation).
#[derive(Debug)]
pub struct Incoming {
    pub payload: Value,
    pub options: SendOptions,
}

/// The dedup_id of a message: its `Nats-Msg-Id` when the publisher gave one (so a message published
/// twice lands once too), else its place in the stream.
pub fn dedup_id(message: &async_nats::Message, stream: &str, sequence: u64) -> String {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(NATS_MESSAGE_ID))
        .map(|id| id.as_str())
        .filter(|id| !id.is_empty())
        .map_or_else(|| format!("{stream}:{sequence}"), str::to_string)
}

/// JSON payloads stay JSON; other UTF-8 text becomes a JSON string.
fn payload(bytes: &[u8]) -> Result<Value, Unstorable> {
    if let Ok(json) = serde_json::from_slice(bytes) {
        return Ok(json);
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(Value::String(text.to_string())),
        Err(_) => Err(Unstorable::NotText),
    }
}

/// The message as bussig stores it: every NATS header (several values joined with ", "), including
/// `traceparent` and `tracestate`, plus where it came from; the relay's own correlation headers
/// become the message's correlation id and reply-to again, and the `group_id_header`'s value, when
/// not empty, its group.
pub fn incoming(
    message: &async_nats::Message,
    stream: &str,
    sequence: u64,
    group_id_header: Option<&str>,
) -> Result<Incoming, Unstorable> {
    let mut options = SendOptions::new().dedup_id(dedup_id(message, stream, sequence));
    if let Some(headers) = &message.headers {
        for (name, values) in headers.iter() {
            let text: Vec<&str> = values.iter().map(|v| v.as_str()).collect();
            let (name, text) = (name.to_string(), text.join(", "));
            if name == CORRELATION_ID_HEADER {
                options = options.correlation_id(text.clone());
            } else if name == REPLY_TO_HEADER {
                options = options.reply_to(text.clone());
            }
            if Some(name.as_str()) == group_id_header && !text.is_empty() {
                options = options.group_id(text.clone());
            }
            options = options.header(name, text);
        }
    }
    let options = options
        .header(STREAM_HEADER, stream)
        .header(SEQUENCE_HEADER, sequence.to_string())
        .header(SUBJECT_HEADER, message.subject.to_string());
    Ok(Incoming {
        payload: payload(&message.payload)?,
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::HeaderMap;
    use serde_json::json;

    fn message(payload: &[u8], headers: &[(&str, &str)]) -> async_nats::Message {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, *value);
        }
        async_nats::Message {
            subject: "partner.orders.eu".into(),
            reply: None,
            payload: payload.to_vec().into(),
            headers: (!headers.is_empty()).then_some(map),
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn the_dedup_id_is_the_message_id_or_the_stream_position() {
        let with_id = message(b"{}", &[("Nats-Msg-Id", "order-7")]);
        assert_eq!(dedup_id(&with_id, "PARTNER", 12), "order-7");
        let without = message(b"{}", &[("tenant", "acme")]);
        assert_eq!(dedup_id(&without, "PARTNER", 12), "PARTNER:12");
        let empty = message(b"{}", &[("Nats-Msg-Id", "")]);
        assert_eq!(dedup_id(&empty, "PARTNER", 13), "PARTNER:13");
    }

    #[test]
    fn headers_and_trace_context_are_kept() {
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let m = message(
            br#"{"order": 1}"#,
            &[
                ("traceparent", traceparent),
                ("tracestate", "vendor=1"),
                ("tenant", "acme"),
                ("tenant", "beta"),
                (CORRELATION_ID_HEADER, "c-1"),
                (REPLY_TO_HEADER, "replies"),
            ],
        );
        let incoming = incoming(&m, "PARTNER", 5, None).unwrap();
        assert_eq!(incoming.payload, json!({"order": 1}));
        let options = &incoming.options;
        let headers = options.headers.as_ref().unwrap();
        assert_eq!(headers["traceparent"], traceparent);
        assert_eq!(headers["tracestate"], "vendor=1");
        assert_eq!(headers["tenant"], "acme, beta");
        assert_eq!(headers[STREAM_HEADER], "PARTNER");
        assert_eq!(headers[SEQUENCE_HEADER], "5");
        assert_eq!(headers[SUBJECT_HEADER], "partner.orders.eu");
        assert_eq!(options.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(options.reply_to.as_deref(), Some("replies"));
        assert_eq!(options.dedup_id.as_deref(), Some("PARTNER:5"));
        assert_eq!(options.group_id, None, "no group header configured");
    }

    #[test]
    fn the_configured_header_becomes_the_group() {
        let m = message(b"{}", &[("Order-Id", "o-17"), ("Bussig-Group-Id", "other")]);
        let grouped = incoming(&m, "S", 1, Some("Order-Id")).unwrap();
        assert_eq!(grouped.options.group_id.as_deref(), Some("o-17"));
        let empty = message(b"{}", &[("Order-Id", "")]);
        let ungrouped = incoming(&empty, "S", 2, Some("Order-Id")).unwrap();
        assert_eq!(
            ungrouped.options.group_id, None,
            "an empty value is no group"
        );
    }

    #[test]
    fn text_payloads_become_strings_and_binary_ones_are_refused() {
        let text = incoming(&message(b"hello", &[]), "S", 1, None).unwrap();
        assert_eq!(text.payload, json!("hello"));
        assert!(matches!(
            incoming(&message(&[0xff, 0xfe], &[]), "S", 1, None),
            Err(Unstorable::NotText)
        ));
    }
}
