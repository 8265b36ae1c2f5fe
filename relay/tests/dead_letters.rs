//! A message JetStream keeps rejecting ends in the dead-letter queue after `max_deliveries`
//! attempts, and the messages around it still arrive (in order on an ordered route). A message
//! that can never be published is dead-lettered at once.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);
/// The stream refuses messages larger than this.
const MAX_MESSAGE_SIZE: i32 = 1024;
const QUEUE_OPTIONS: &str = "max_deliveries => 3, retry_delay => '100 milliseconds'";

fn too_big(i: i64) -> Value {
    json!({ "i": i, "blob": "x".repeat(2 * MAX_MESSAGE_SIZE as usize) })
}

fn header<'a>(headers: &'a Option<Value>, name: &str) -> Option<&'a str> {
    headers.as_ref()?.get(name)?.as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_messages_end_in_the_dead_letter_queue() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "DEAD", &["dead.>"], MAX_MESSAGE_SIZE).await;
    let plain = Queue::create(&db, "dead_plain", QUEUE_OPTIONS).await;
    let ordered = Queue::create(&db, "dead_ordered", QUEUE_OPTIONS).await;

    let mut plain_ids = send_each(&db, &plain.name, (0..5).map(|i| json!({ "i": i }))).await;
    let rejected_plain = send_each(&db, &plain.name, [too_big(5)]).await[0];
    let unpublishable: i64 = db
        .query_one(
            "SELECT bussig.send($1::text, $2::jsonb, headers => $3::jsonb)",
            &[&plain.name, &json!({ "i": 6 }), &json!({ "bad name": "x" })],
        )
        .await
        .expect("send")
        .get(0);
    plain_ids.extend(send_each(&db, &plain.name, (7..12).map(|i| json!({ "i": i }))).await);

    let mut ordered_ids = send_each(&db, &ordered.name, (0..5).map(|i| json!({ "i": i }))).await;
    let rejected_ordered = send_each(&db, &ordered.name, [too_big(5)]).await[0];
    ordered_ids.extend(send_each(&db, &ordered.name, (6..12).map(|i| json!({ "i": i }))).await);

    let config = format!(
        "{FAST}{}{}",
        route(&plain.name, "dead.plain", "batch_size = 4"),
        route(
            &ordered.name,
            "dead.ordered",
            "batch_size = 4\nordered = true"
        ),
    );
    let relay = Relay::start_ready(&nats.url(), &config).await;

    wait_relayed(&db, &js, "DEAD", &plain.name, plain_ids.len(), LONG).await;
    wait_relayed(&db, &js, "DEAD", &ordered.name, ordered_ids.len(), LONG).await;
    let stored = stream_messages(&js, "DEAD").await;
    assert_exactly_once(&stored, &plain.name, &plain_ids, false);
    assert_exactly_once(&stored, &ordered.name, &ordered_ids, true);

    let mut dead = peek(&db, &plain.dlq()).await;
    dead.sort_by_key(|(id, _, _)| *id);
    let dead_ids: Vec<i64> = dead.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(dead_ids, [rejected_plain, unpublishable]);
    let (_, payload, headers) = &dead[0];
    assert_eq!(payload["i"], 5);
    assert_eq!(
        header(headers, "bussig-dead-letter-reason"),
        Some("max_deliveries")
    );
    let error = header(headers, "bussig-dead-letter-error").unwrap_or("");
    assert!(
        error.contains("maximum"),
        "JetStream's reason is kept: {error}"
    );
    assert_eq!(
        header(headers, "bussig-source-queue"),
        Some(plain.name.as_str())
    );
    let (_, _, headers) = &dead[1];
    assert_eq!(
        header(headers, "bussig-dead-letter-reason"),
        Some("unpublishable")
    );
    assert!(header(headers, "bussig-dead-letter-error")
        .unwrap_or("")
        .contains("bad name"));

    let dead = peek(&db, &ordered.dlq()).await;
    assert_eq!(dead.len(), 1);
    let (id, _, headers) = &dead[0];
    assert_eq!(*id, rejected_ordered);
    assert_eq!(
        header(headers, "bussig-dead-letter-reason"),
        Some("max_deliveries")
    );
    assert!(header(headers, "bussig-dead-letter-error")
        .unwrap_or("")
        .contains("maximum"));

    let metrics = relay.metrics().await;
    for (queue, dead_lettered) in [(&plain.name, 2.0), (&ordered.name, 1.0)] {
        let rejected =
            format!("bussig_relay_failed_total{{route=\"{queue}\",reason=\"rejected\"}}");
        assert_eq!(metric(&metrics, &rejected), Some(3.0), "{metrics}");
        let dead = format!("bussig_relay_dead_lettered_total{{route=\"{queue}\"}}");
        assert_eq!(metric(&metrics, &dead), Some(dead_lettered), "{metrics}");
    }
}

/// "No responders" (no stream captures the subject) is what JetStream answers while a node
/// restarts or a stream elects a leader, too: the message is held for a few tries, not nacked at
/// once (its deliveries would run out within a second here), and goes out once a stream captures it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_no_stream_answers_for_a_moment_is_held_until_one_does() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "HELD", &["held.known"], 1 << 20).await;
    let queue = Queue::create(&db, "held_unanswered", QUEUE_OPTIONS).await;
    db.execute(
        "SELECT bussig.subscribe($1::text, 'held.>')",
        &[&queue.name],
    )
    .await
    .expect("subscribe");
    db.execute("SELECT bussig.publish('held.later', '{\"i\": 1}')", &[])
        .await
        .expect("publish");
    let config = format!("{FAST}{}", route(&queue.name, "held.known", ""));
    let relay = Relay::start_ready(&nats.url(), &config).await;

    // Past three deliveries' worth of the queue's backoff: a rejection would be dead-lettered by now.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(total(&db, &queue.dlq()).await, 0, "dead-lettered");
    assert_eq!(total(&db, &queue.name).await, 1, "the message is held");

    create_stream(&js, "LATER", &["held.later"], 1 << 20).await;
    wait_relayed(&db, &js, "LATER", &queue.name, 1, LONG).await;
    assert_eq!(total(&db, &queue.dlq()).await, 0);
    drop(relay);
}
