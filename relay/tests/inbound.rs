//! Inbound routes: JetStream messages land in bussig exactly once, with their headers, even when
//! NATS delivers them again (an ack that came after ack_wait, or never came from a relay that died
//! after its commit) or the relay is killed in the middle of a batch and started again.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use common::*;
use serde_json::Value;
use tokio_postgres::Client;

const LONG: Duration = Duration::from_secs(60);

/// Publishes `{"i": i}` on `subject` for each i, with `Nats-Msg-Id: m-<i>` when `with_ids`.
async fn publish(
    js: &jetstream::Context,
    subject: &str,
    range: std::ops::Range<i64>,
    with_ids: bool,
) {
    for i in range {
        let mut headers = HeaderMap::new();
        if with_ids {
            headers.insert("Nats-Msg-Id", format!("m-{i}").as_str());
        }
        headers.insert("tenant", "acme");
        let payload = serde_json::to_vec(&json!({ "i": i })).unwrap();
        js.publish_with_headers(subject.to_string(), headers, payload.into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
    }
}

/// The `i` of every message in the queue, in id order (repeats kept).
async fn received(db: &Client, queue: &str) -> Vec<i64> {
    let mut messages = peek(db, queue).await;
    messages.sort_by_key(|(id, _, _)| *id);
    messages
        .iter()
        .map(|(_, payload, _)| payload["i"].as_i64().expect("payload has i"))
        .collect()
}

/// Panics unless the queue holds each of `expected` exactly once.
async fn assert_exactly_once(db: &Client, queue: &str, expected: std::ops::Range<i64>) {
    let got = received(db, queue).await;
    let distinct: BTreeSet<i64> = got.iter().copied().collect();
    assert_eq!(got.len(), distinct.len(), "{queue}: a message landed twice");
    assert_eq!(
        distinct,
        expected.collect::<BTreeSet<_>>(),
        "{queue}: missing or extra messages"
    );
}

async fn consumer_info(js: &jetstream::Context, stream: &str, name: &str) -> consumer::Info {
    let stream = js.get_stream(stream).await.expect("stream");
    let mut consumer: consumer::PullConsumer = stream
        .get_consumer(name)
        .await
        .expect("the relay created the consumer");
    consumer.info().await.expect("consumer info").clone()
}

/// Waits until NATS has no message of the consumer left to deliver or to be acked.
async fn wait_settled(js: &jetstream::Context, stream: &str, name: &str) -> consumer::Info {
    eventually(LONG, "every message acked to NATS", async || {
        let info = consumer_info(js, stream, name).await;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(info)
    })
    .await
}

/// An uncommitted send that claims `dedup_id` in `queue`: a relay storing a message with that id
/// waits for this transaction, in the middle of its batch.
async fn hold_dedup_id(queue: &str, dedup_id: &str) -> Client {
    let holder = connect().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            "SELECT bussig.send($1::text, '{}'::jsonb, dedup_id => $2::text)",
            &[&queue, &dedup_id],
        )
        .await
        .expect("claim the dedup_id");
    holder
}

fn inbound(stream: &str, consumer: &str, target: &str, extra: &str) -> String {
    format!("[[inbound]]\nstream = \"{stream}\"\nconsumer = \"{consumer}\"\n{target}\n{extra}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_nats_delivers_again_land_once_with_their_headers() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "INBOX", &["inbox.>"], -1).await;
    let queue = Queue::create(&db, "inbound_again", "").await;
    let fan_in = Queue::create(&db, "inbound_topic", "").await;
    let topic = format!("t{}", fan_in.name.replace('_', ""));
    db.execute(
        "SELECT bussig.subscribe($1::text, $2::text)",
        &[&fan_in.name, &format!("{topic}.*")],
    )
    .await
    .expect("subscribe");

    // The first messages carry a Nats-Msg-Id, the rest are known by their stream sequence.
    publish(&js, "inbox.orders.eu", 0..10, true).await;
    publish(&js, "inbox.orders.us", 10..20, false).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut traced = HeaderMap::new();
    traced.insert("traceparent", traceparent);
    traced.insert("tracestate", "vendor=1");
    js.publish_with_headers(
        "inbox.events.created",
        traced,
        br#"{"i": 0}"#.to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    // The relay's first batch waits on this transaction for longer than ack_wait, so NATS
    // delivers the whole batch again before the relay can ack it.
    let holder = hold_dedup_id(&queue.name, "m-3").await;
    let config = format!(
        "{FAST}{}{}",
        inbound(
            "INBOX",
            "orders",
            &format!("queue = \"{}\"", queue.name),
            "filter_subject = \"inbox.orders.>\"\nack_wait = \"1s\"\nbatch_size = 50"
        ),
        inbound(
            "INBOX",
            "events",
            &format!("subject = \"{topic}.in\""),
            "filter_subject = \"inbox.events.>\""
        ),
    );
    let relay = Relay::start_ready(&nats.url(), &config).await;
    eventually(LONG, "NATS to deliver the held batch again", async || {
        (consumer_info(&js, "INBOX", "orders").await.num_redelivered > 0).then_some(())
    })
    .await;
    holder.batch_execute("ROLLBACK").await.unwrap();

    wait_settled(&js, "INBOX", "orders").await;
    wait_settled(&js, "INBOX", "events").await;
    assert_exactly_once(&db, &queue.name, 0..20).await;
    // Whether the relay also meets a copy NATS sent again (and counts it a duplicate) depends on timing:
    // once the first delivery is acked, a copy still in the client's buffer may be dropped unread. What
    // must hold either way is above: each message once, and below: each stored once.
    let metrics = relay.metrics().await;
    let stored = r#"bussig_relay_inbound_stored_total{inbound="INBOX/orders"}"#;
    assert_eq!(metric(&metrics, stored), Some(20.0), "{metrics}");

    let messages = peek(&db, &queue.name).await;
    let header = |i: i64, name: &str| -> Option<String> {
        let (_, _, headers) = messages.iter().find(|(_, p, _)| p["i"] == i)?;
        headers.as_ref()?.get(name)?.as_str().map(str::to_string)
    };
    assert_eq!(header(3, "Nats-Msg-Id").as_deref(), Some("m-3"));
    assert_eq!(header(3, "tenant").as_deref(), Some("acme"));
    assert_eq!(header(3, "Nats-Stream").as_deref(), Some("INBOX"));
    assert_eq!(
        header(3, "Nats-Subject").as_deref(),
        Some("inbox.orders.eu")
    );
    assert_eq!(header(12, "Nats-Msg-Id"), None);
    assert!(header(12, "Nats-Sequence").is_some());

    let published = peek(&db, &fan_in.name).await;
    assert_eq!(published.len(), 1, "{published:?}");
    let (_, payload, headers) = &published[0];
    assert_eq!(payload, &json!({ "i": 0 }));
    let headers = headers.clone().unwrap_or(Value::Null);
    assert_eq!(headers["traceparent"], traceparent);
    assert_eq!(headers["tracestate"], "vendor=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_in_the_middle_of_a_batch_stores_every_message_once() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "INKILL", &["inkill.>"], -1).await;
    let queue = Queue::create(&db, "inbound_kill", "").await;
    const COUNT: i64 = 600;
    publish(&js, "inkill.orders", 0..COUNT, true).await;

    // As if a relay had committed the first ten and died before its acks reached NATS.
    for i in 0..10 {
        db.execute(
            "SELECT bussig.send($1::text, $2::jsonb, dedup_id => $3::text)",
            &[&queue.name, &json!({ "i": i }), &format!("m-{i}")],
        )
        .await
        .expect("send");
    }
    // The relay stores batches until the one holding m-400, and waits in its transaction there.
    let holder = hold_dedup_id(&queue.name, "m-400").await;
    let config = format!(
        "{FAST}{}",
        inbound(
            "INKILL",
            "orders",
            &format!("queue = \"{}\"", queue.name),
            "ack_wait = \"2s\"\nbatch_size = 25"
        ),
    );
    let mut relay = Relay::start_ready(&nats.url(), &config).await;
    let stored = r#"bussig_relay_inbound_stored_total{inbound="INKILL/orders"}"#;
    eventually(
        LONG,
        "the relay to store the batches before m-400",
        async || (metric(&relay.metrics().await, stored)? >= 300.0).then_some(()),
    )
    .await;
    let duplicates = r#"bussig_relay_inbound_duplicates_total{inbound="INKILL/orders"}"#;
    assert_eq!(metric(&relay.metrics().await, duplicates), Some(10.0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.kill();
    let before = total(&db, &queue.name).await;
    assert!(
        before < COUNT + 1,
        "the relay finished before it was killed: {before}"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();

    relay.start(&nats.url());
    relay.wait_ready().await;
    let settled = wait_settled(&js, "INKILL", "orders").await;
    assert!(
        settled.delivered.consumer_sequence > COUNT as u64,
        "NATS delivered the interrupted batch again: {settled:?}"
    );
    assert_exactly_once(&db, &queue.name, 0..COUNT).await;
    relay.assert_running();
}
