//! Messages sent in committed transactions reach the stream exactly once, in order on an ordered
//! route, with their headers, on the mapped subject; rolled-back ones never do.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio_postgres::Client;

/// The `i` field of the payloads of `queue`'s messages, in stream order.
fn sequence_numbers(stored: &[Stored], queue: &str) -> Vec<i64> {
    stored
        .iter()
        .filter(|m| m.header("Bussig-Queue") == Some(queue))
        .map(|m| m.payload["i"].as_i64().expect("payload has i"))
        .collect()
}

/// Sends `i` to the ordered queue: every third message straight to the queue, the others through
/// the topic, so both the fixed and the mapped subject are used.
async fn send_ordered(db: &Client, queue: &str, topic: &str, i: i64) {
    let payload = json!({ "i": i });
    if i % 3 == 2 {
        send_each(db, queue, [payload]).await;
    } else {
        let region = if i % 2 == 0 { "eu" } else { "us" };
        let receivers: i32 = db
            .query_one(
                "SELECT bussig.publish($1::text, $2::jsonb)",
                &[&format!("{topic}.{region}"), &payload],
            )
            .await
            .expect("publish")
            .get(0);
        assert_eq!(receivers, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_messages_arrive_once_and_rolled_back_ones_never() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    let plain = Queue::create(&db, "e2e_plain", "").await;
    let ordered = Queue::create(&db, "e2e_ordered", "").await;
    let topic = format!("t{}", ordered.name.replace('_', ""));
    db.execute(
        "SELECT bussig.subscribe($1::text, $2::text)",
        &[&ordered.name, &format!("{topic}.*")],
    )
    .await
    .expect("subscribe");

    // Before the relay runs: one transaction per message, one for many, one that rolls back.
    let mut plain_ids = send_each(&db, &plain.name, (0..20).map(|i| json!({ "i": i }))).await;
    let batch: Vec<Value> = (20..40).map(|i| json!({ "i": i })).collect();
    plain_ids.extend(send_batch(&db, &plain.name, &batch).await);
    let decorated: i64 = db
        .query_one(
            "SELECT bussig.send($1::text, $2::jsonb, headers => $3::jsonb, \
                    correlation_id => 'corr-7', reply_to => 'replies.7')",
            &[
                &plain.name,
                &json!({ "i": 40 }),
                &json!({ "tenant": "acme", "attempt": 2 }),
            ],
        )
        .await
        .expect("send with headers")
        .get(0);
    plain_ids.push(decorated);
    for i in 0..30 {
        send_ordered(&db, &ordered.name, &topic, i).await;
    }
    db.batch_execute("BEGIN").await.unwrap();
    send_each(
        &db,
        &plain.name,
        (0..10).map(|_| json!({ "rolled_back": true })),
    )
    .await;
    send_ordered(&db, &ordered.name, &topic, -1).await;
    db.batch_execute("ROLLBACK").await.unwrap();

    // The relay creates the stream it is told about.
    let config = format!(
        "{FAST}[[stream]]\nname = \"E2E\"\nsubjects = [\"e2e.>\"]\nduplicate_window = \"2m\"\n{}{}",
        route(&plain.name, "e2e.plain", "batch_size = 8"),
        route(
            &ordered.name,
            "e2e.ordered",
            &format!("ordered = true\nbatch_size = 7\n[[route.map]]\nfrom = \"{topic}.*\"\nto = \"e2e.orders.*\"")
        ),
    );
    let mut relay = Relay::start_ready(&nats.url(), &config).await;

    // While it runs: the relay is woken by these commits.
    plain_ids.extend(send_each(&db, &plain.name, (41..61).map(|i| json!({ "i": i }))).await);
    for i in 30..60 {
        send_ordered(&db, &ordered.name, &topic, i).await;
    }
    db.batch_execute("BEGIN").await.unwrap();
    send_each(&db, &plain.name, [json!({ "rolled_back": true })]).await;
    db.batch_execute("ROLLBACK").await.unwrap();

    let timeout = Duration::from_secs(30);
    wait_relayed(&db, &js, "E2E", &plain.name, plain_ids.len(), timeout).await;
    wait_relayed(&db, &js, "E2E", &ordered.name, 60, timeout).await;
    let stored = stream_messages(&js, "E2E").await;
    let mut stream = js
        .get_stream("E2E")
        .await
        .expect("the relay created the stream");
    let created = stream.info().await.expect("stream info").config.clone();
    assert_eq!(created.duplicate_window, Duration::from_secs(120));

    let plain_stored = assert_exactly_once(&stored, &plain.name, &plain_ids, false);
    assert!(plain_stored.iter().all(|m| m.subject == "e2e.plain"));
    let special = plain_stored
        .iter()
        .find(|m| m.message_id() == decorated)
        .expect("the message with headers");
    assert_eq!(special.payload, json!({ "i": 40 }));
    assert_eq!(special.header("tenant"), Some("acme"));
    assert_eq!(special.header("attempt"), Some("2"));
    assert_eq!(special.header("Bussig-Correlation-Id"), Some("corr-7"));
    assert_eq!(special.header("Bussig-Reply-To"), Some("replies.7"));

    // The ordered route: every message once, in sending order, each on its subject.
    assert_eq!(
        sequence_numbers(&stored, &ordered.name),
        (0..60).collect::<Vec<_>>()
    );
    let ordered_stored: Vec<&Stored> = stored
        .iter()
        .filter(|m| m.header("Bussig-Queue") == Some(ordered.name.as_str()))
        .collect();
    let mut ids: Vec<i64> = ordered_stored.iter().map(|m| m.message_id()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 60, "an ordered message was stored twice");
    for m in &ordered_stored {
        let i = m.payload["i"].as_i64().unwrap();
        let expected = match (i % 3, i % 2) {
            (2, _) => "e2e.ordered".to_string(),
            (_, 0) => "e2e.orders.eu".to_string(),
            _ => "e2e.orders.us".to_string(),
        };
        assert_eq!(m.subject, expected, "subject of message {i}");
        if i % 3 != 2 {
            let region = if i % 2 == 0 { "eu" } else { "us" };
            assert_eq!(
                m.header("Bussig-Subject"),
                Some(format!("{topic}.{region}").as_str())
            );
        }
    }
    assert!(
        stored
            .iter()
            .all(|m| m.payload.get("rolled_back").is_none() && m.payload["i"] != -1),
        "a rolled-back message reached the stream"
    );

    let metrics = relay.metrics().await;
    let published = format!("bussig_relay_published_total{{route=\"{}\"}}", plain.name);
    assert_eq!(
        metric(&metrics, &published),
        Some(plain_ids.len() as f64),
        "{metrics}"
    );
    let in_flight = format!("bussig_relay_in_flight{{route=\"{}\"}}", ordered.name);
    assert_eq!(metric(&metrics, &in_flight), Some(0.0));
    assert_eq!(
        http_get(relay.metrics_port, "/health").await.map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        http_get(relay.metrics_port, "/nowhere").await.map(|r| r.0),
        Some(404)
    );

    let status = relay.terminate().await;
    assert!(status.success(), "SIGTERM ended the relay with {status}");
}
