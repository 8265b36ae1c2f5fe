//! Delivery order and admission: delays, priorities, FIFO within a priority,
//! dedup ids, and purge.

use std::time::{Duration, Instant};

use serde_json::Value;

use bussig_tests::*;

#[test]
fn delay_priority_dedup() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "delay_priority_dedup", "");
    let q = queue.name.as_str();

    // A delayed message waits out its delay, then is delivered.
    let sent_at = Instant::now();
    let id: i64 = client
        .query_one(
            "SELECT bussig.send($1::text, '{\"k\":\"late\"}', delay => '2 seconds')",
            &[&q],
        )
        .unwrap()
        .get(0);
    assert!(
        read_one(&mut client, q).is_none(),
        "delayed message delivered at once"
    );
    assert_eq!(peek(&mut client, q)[0].state, "delayed");
    let d = eventually(Duration::from_secs(10), "the delayed message", || {
        read_one(&mut client, q)
    });
    assert_eq!(d.id, id);
    assert!(
        sent_at.elapsed() >= Duration::from_millis(1900),
        "delivered before its delay"
    );
    assert!(ack(&mut client, q, d.id, d.token));

    // Highest priority first, whatever the send order.
    for p in [0, 5, 1] {
        send_priority(&mut client, q, json!({ "p": p }), p);
    }
    assert_eq!(
        drain_in_order(&mut client, q),
        [json!({ "p": 5 }), json!({ "p": 1 }), json!({ "p": 0 })]
    );

    // Within one priority, send order.
    for k in ["a", "b", "c"] {
        send_priority(&mut client, q, json!({ "k": k }), 2);
    }
    assert_eq!(
        drain_in_order(&mut client, q),
        [
            json!({ "k": "a" }),
            json!({ "k": "b" }),
            json!({ "k": "c" })
        ]
    );

    // A repeated dedup_id is dropped: NULL id and nothing queued.
    assert!(send_dedup(&mut client, q, json!({ "v": 1 }), "d-1").is_some());
    assert_eq!(send_dedup(&mut client, q, json!({ "v": 2 }), "d-1"), None);
    assert!(send_dedup(&mut client, q, json!({ "v": 3 }), "d-2").is_some());
    let mut queued: Vec<Value> = peek(&mut client, q)
        .into_iter()
        .map(|m| m.payload)
        .collect();
    queued.sort_by_key(|v| v["v"].as_i64());
    assert_eq!(queued, [json!({ "v": 1 }), json!({ "v": 3 })]);

    // Purge reports what it removed and leaves the queue empty.
    send_batch(
        &mut client,
        q,
        &[json!({ "v": 4 }), json!({ "v": 5 }), json!({ "v": 6 })],
    );
    assert_eq!(counts(&mut client, q), (5, 0, 0));
    let purged: i64 = client
        .query_one("SELECT bussig.purge_queue($1::text)", &[&q])
        .unwrap()
        .get(0);
    assert_eq!(purged, 5);
    assert!(peek(&mut client, q).is_empty());
    assert_eq!(counts(&mut client, q), (0, 0, 0));
    // The dedup window covers what was sent, not just what is still queued.
    assert_eq!(send_dedup(&mut client, q, json!({ "v": 7 }), "d-1"), None);
}

fn send_priority(c: &mut Client, q: &str, payload: Value, priority: i32) {
    let sql = "SELECT bussig.send($1::text, $2::jsonb, priority => $3::int)";
    c.query_one(sql, &[&q, &payload, &priority])
        .expect("send with priority");
}

fn send_dedup(c: &mut Client, q: &str, payload: Value, dedup_id: &str) -> Option<i64> {
    let sql = "SELECT bussig.send($1::text, $2::jsonb, dedup_id => $3::text)";
    c.query_one(sql, &[&q, &payload, &dedup_id])
        .expect("send with dedup_id")
        .get(0)
}

/// Reads one message at a time (earlier ones stay locked, so each read picks
/// the next in line), then acks them all with ack_batch.
fn drain_in_order(c: &mut Client, q: &str) -> Vec<Value> {
    let mut got = Vec::new();
    while let Some(d) = read_one(c, q) {
        got.push(d);
    }
    assert_eq!(
        ack_batch(c, q, &got),
        got.len() as i64,
        "ack_batch did not ack every message"
    );
    got.into_iter().map(|d| d.payload).collect()
}
