//! Ordered message groups through the relay: each group reaches JetStream in send order with a
//! `Bussig-Group-Id` header, groups do not wait for each other (a group JetStream keeps refusing
//! holds back only itself), and a killed relay or two relays at once keep every group in order.
//! Inbound, the group header becomes the bussig message's group again.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use common::*;
use serde_json::Value;
use tokio_postgres::Client;

const LONG: Duration = Duration::from_secs(60);

/// A group's `k`s (or the ungrouped messages', under None) in the order they were stored.
type Lanes = BTreeMap<Option<String>, Vec<i64>>;

fn group_names(count: usize) -> Vec<String> {
    (0..count).map(|g| format!("g{g:02}")).collect()
}

/// Round k sends message k of every group and, when `ungrouped`, two ungrouped messages, in one
/// transaction. Payloads are `{"group": g, "k": k}`; returns how many were sent.
async fn send_interleaved(
    db: &Client,
    queue: &str,
    groups: &[String],
    rounds: i64,
    ungrouped: bool,
) -> usize {
    let mut lanes: Vec<Option<String>> = groups.iter().cloned().map(Some).collect();
    if ungrouped {
        lanes.extend([None, None]);
    }
    let mut sent = 0;
    for k in 0..rounds {
        let payloads: Vec<Value> = lanes
            .iter()
            .enumerate()
            .map(|(i, group)| {
                // The two ungrouped messages of round k are 2k and 2k + 1.
                let k = if group.is_some() {
                    k
                } else {
                    2 * k + (i - groups.len()) as i64
                };
                json!({ "group": group, "k": k })
            })
            .collect();
        db.query(
            "SELECT bussig.send_batch($1::text, $2::jsonb[], group_ids => $3::text[])",
            &[&queue, &payloads, &lanes],
        )
        .await
        .expect("send_batch with group_ids");
        sent += payloads.len();
    }
    sent
}

/// The queue's messages in `stored`, by group in stream order; each must carry its group in the
/// `Bussig-Group-Id` header, and only a grouped one may carry it.
fn lanes(stored: &[Stored], queue: &str) -> Lanes {
    let mut lanes = Lanes::new();
    for message in stored
        .iter()
        .filter(|m| m.header("Bussig-Queue") == Some(queue))
    {
        let group = message.payload["group"].as_str().map(str::to_string);
        assert_eq!(
            message.header("Bussig-Group-Id"),
            group.as_deref(),
            "message {} carries its group",
            message.message_id()
        );
        let k = message.payload["k"].as_i64().expect("payload has k");
        lanes.entry(group).or_default().push(k);
    }
    lanes
}

/// Panics unless each group holds 0..per_group, each once, in send order.
fn assert_in_send_order(lanes: &Lanes, groups: &[String], per_group: i64) {
    let expected: Vec<i64> = (0..per_group).collect();
    for group in groups {
        assert_eq!(
            lanes.get(&Some(group.clone())),
            Some(&expected),
            "group {group}: not every message once in send order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_route_keeps_each_group_in_order_and_a_refused_group_holds_back_only_itself() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "GROUPS", &["groups.>"], -1).await;
    // Retried every half second for as long as the test needs: only the test ends the refusal.
    let queue = Queue::create(
        &db,
        "groups_ordered",
        "max_deliveries => 1000, retry_delay => '500 milliseconds', retry_multiplier => 1",
    )
    .await;
    let topic = format!("t{}", queue.name.replace('_', ""));
    db.execute(
        "SELECT bussig.subscribe($1::text, $2::text)",
        &[&queue.name, &format!("{topic}.*")],
    )
    .await
    .expect("subscribe");
    // No stream captures the topic yet: JetStream refuses the `stuck` group's head.
    let stuck = "stuck".to_string();
    for k in 0..5 {
        db.execute(
            "SELECT bussig.publish($1::text, $2::jsonb, group_id => $3::text)",
            &[
                &format!("{topic}.stuck"),
                &json!({ "group": stuck, "k": k }),
                &stuck,
            ],
        )
        .await
        .expect("publish to the stuck group");
    }
    let groups = group_names(12);
    let rounds = 10;
    let flowing = send_interleaved(&db, &queue.name, &groups, rounds, true).await;

    let config = format!(
        "{FAST}{}",
        route(&queue.name, "groups.out", "ordered = true\nbatch_size = 16")
    );
    let relay = Relay::start_ready(&nats.url(), &config).await;
    eventually(
        LONG,
        "every group but the refused one relayed",
        async || {
            let relayed = stream_count(&js, "GROUPS").await >= flowing as u64;
            // Acked too: only the refused group's messages are left in the queue.
            (relayed && total(&db, &queue.name).await == 5).then_some(())
        },
    )
    .await;
    let stored = stream_messages(&js, "GROUPS").await;
    let flowed = lanes(&stored, &queue.name);
    assert_in_send_order(&flowed, &groups, rounds);
    let ungrouped: Vec<i64> = (0..2 * rounds).collect();
    assert_eq!(
        flowed.get(&None),
        Some(&ungrouped),
        "ungrouped messages keep the queue's order"
    );
    assert!(!flowed.contains_key(&Some(stuck.clone())));
    let blocked: Vec<String> = db
        .query(
            "SELECT group_id FROM bussig.blocked_groups($1::text)",
            &[&queue.name],
        )
        .await
        .expect("blocked_groups")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        blocked,
        [stuck.as_str()],
        "the refused group waits in bussig"
    );

    // Groups interleave in the stream: every group's first message comes before any group's last.
    let position = |group: &String, k: i64| {
        stored.iter().position(|m| {
            m.payload["group"].as_str() == Some(group.as_str()) && m.payload["k"] == k
        })
    };
    let last_first = groups.iter().filter_map(|g| position(g, 0)).max();
    let first_last = groups.iter().filter_map(|g| position(g, rounds - 1)).min();
    assert!(
        last_first < first_last,
        "groups were relayed one after another"
    );

    // Once a stream takes the topic, the refused group follows in its own order.
    create_stream(&js, "STUCK", &[&format!("{topic}.>")], -1).await;
    wait_relayed(&db, &js, "STUCK", &queue.name, 5, LONG).await;
    let refused = lanes(&stream_messages(&js, "STUCK").await, &queue.name);
    assert_in_send_order(&refused, &[stuck], 5);
    assert_eq!(
        total(&db, &queue.dlq()).await,
        0,
        "nothing was dead-lettered"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_in_the_middle_of_a_batch_keeps_every_group_in_order() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "GKILL", &["gkill.>"], -1).await;
    let queue = Queue::create(&db, "groups_kill", "").await;
    let groups = group_names(20);
    let rounds = 50;
    let sent = send_interleaved(&db, &queue.name, &groups, rounds, false).await;
    let config = format!(
        "{FAST}{}",
        route(&queue.name, "gkill.out", "ordered = true\nbatch_size = 20")
    );
    let mut relay = Relay::spawn(&nats.url(), &config);

    // SIGKILL as soon as the relay made progress, until two kills caught it holding a batch (its
    // groups then wait for their locks to run out) or it is done.
    let mut caught = 0;
    for _ in 0..20 {
        let before = stream_count(&js, "GKILL").await;
        if before >= sent as u64 || caught == 2 {
            break;
        }
        eventually(LONG, "the relay to make progress", async || {
            let now = stream_count(&js, "GKILL").await;
            (now > before || now >= sent as u64).then_some(())
        })
        .await;
        relay.kill();
        let (_, _, locked) = counts(&db, &queue.name).await;
        if locked > 0 {
            caught += 1;
        }
        relay.start(&nats.url());
    }
    assert!(caught > 0, "never caught the relay with a batch in flight");

    wait_relayed(&db, &js, "GKILL", &queue.name, sent, LONG).await;
    let stored = stream_messages(&js, "GKILL").await;
    assert_in_send_order(&lanes(&stored, &queue.name), &groups, rounds);
    assert_eq!(stored.len(), sent, "a message was stored twice");
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_an_unordered_route_keep_every_group_in_order() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "GPAIR", &["gpair.>"], -1).await;
    let queue = Queue::create(&db, "groups_pair", "").await;
    let groups = group_names(10);
    let rounds = 30;
    let sent = send_interleaved(&db, &queue.name, &groups, rounds, false).await;
    let config = format!(
        "{FAST}{}",
        route(&queue.name, "gpair.out", "batch_size = 4\nconcurrency = 3")
    );
    let mut relays = [
        Relay::spawn(&nats.url(), &config),
        Relay::spawn(&nats.url(), &config),
    ];

    wait_relayed(&db, &js, "GPAIR", &queue.name, sent, LONG).await;
    let stored = stream_messages(&js, "GPAIR").await;
    assert_in_send_order(&lanes(&stored, &queue.name), &groups, rounds);
    assert_eq!(stored.len(), sent, "a message was stored twice");
    for relay in &mut relays {
        relay.assert_running();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_route_makes_the_group_header_the_group_again() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "GIN", &["gin.>"], -1).await;
    let queue = Queue::create(&db, "groups_inbound", "").await;
    for (i, group) in [Some("a"), Some("b"), Some("a"), None]
        .into_iter()
        .enumerate()
    {
        let mut headers = HeaderMap::new();
        if let Some(group) = group {
            headers.insert("Bussig-Group-Id", group);
        }
        let payload = serde_json::to_vec(&json!({ "i": i })).unwrap();
        js.publish_with_headers("gin.orders", headers, payload.into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
    }
    let config = format!(
        "{FAST}[[inbound]]\nstream = \"GIN\"\nconsumer = \"gin\"\nqueue = \"{}\"\n",
        queue.name
    );
    let relay = Relay::start_ready(&nats.url(), &config).await;
    let landed: Vec<(i64, Option<String>, String)> = eventually(LONG, "4 messages", async || {
        let rows = db
            .query(
                "SELECT (payload->>'i')::bigint, group_id, state FROM bussig.peek($1::text, 10)
                  ORDER BY 1",
                &[&queue.name],
            )
            .await
            .expect("peek");
        let rows: Vec<(i64, Option<String>, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        (rows.len() == 4).then_some(rows)
    })
    .await;
    let groups: Vec<(i64, Option<&str>)> =
        landed.iter().map(|(i, g, _)| (*i, g.as_deref())).collect();
    assert_eq!(
        groups,
        [(0, Some("a")), (1, Some("b")), (2, Some("a")), (3, None)]
    );
    assert_eq!(
        landed[2].2, "waiting_in_group",
        "the second message of group a waits"
    );
    drop(relay);
}
