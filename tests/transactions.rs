//! Every bussig call runs in the caller's transaction: a rollback undoes
//! sends, reads (locks and delivery counts) and acks alike.

use std::time::{Duration, Instant};

use bussig_tests::*;
use serde_json::Value;

#[test]
fn transactions() {
    let mut client = connect();
    let mut other = connect();
    let queue = Queue::create(&mut client, "transactions", "");
    let q = queue.name.as_str();

    // A rolled-back send is never delivered.
    let mut tx = client.transaction().unwrap();
    send(&mut tx, q, &json!({ "rolled": "back" }));
    tx.rollback().unwrap();
    assert!(
        read(&mut client, q, 10, None).is_empty(),
        "rolled-back send was delivered"
    );
    assert!(
        peek(&mut client, q).is_empty(),
        "rolled-back send is visible to peek"
    );

    // An uncommitted send is invisible to other connections until commit.
    let mut tx = client.transaction().unwrap();
    let id = send(&mut tx, q, &json!({ "k": 1 }));
    assert!(
        read_one(&mut other, q).is_none(),
        "uncommitted send was delivered"
    );
    tx.commit().unwrap();

    // A rolled-back read leaves the message ready with its count unchanged.
    let mut tx = client.transaction().unwrap();
    let first = read_one(&mut tx, q).expect("committed send is readable");
    assert_eq!((first.id, first.delivery_count), (id, 1));
    tx.rollback().unwrap();
    let seen = peek(&mut client, q);
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].state.as_str(), seen[0].delivery_count),
        ("ready", 0)
    );
    assert!(
        !ack(&mut client, q, id, first.token),
        "token of a rolled-back read acked"
    );

    let second = read_one(&mut client, q).expect("message is ready again after rollback");
    assert_eq!((second.id, second.delivery_count), (id, 1));
    assert_ne!(
        second.token, first.token,
        "a new read must get a fresh token"
    );
    assert!(
        !ack(&mut client, q, id, first.token),
        "token of a rolled-back read acked"
    );

    // A rolled-back ack leaves the message locked under the same token.
    let mut tx = client.transaction().unwrap();
    assert!(ack(&mut tx, q, id, second.token));
    tx.rollback().unwrap();
    let seen = peek(&mut client, q);
    assert_eq!(seen.len(), 1, "rolled-back ack removed the message");
    assert_eq!(seen[0].state, "locked");
    assert!(
        ack(&mut client, q, id, second.token),
        "token should still ack after rollback"
    );
    assert!(peek(&mut client, q).is_empty());
}

/// A consumer reading on through a backlog starts where its last read began; messages another
/// consumer had locked and then released by rolling back lie behind that place, and must still come.
#[test]
fn rolled_back_reads_behind_a_busy_consumer_are_still_delivered() {
    let mut busy = connect();
    let mut other = connect();
    let queue = Queue::create(&mut busy, "rolled_back_behind", "");
    let q = queue.name.as_str();
    let payloads: Vec<Value> = (1..=40).map(|n| json!({ "n": n })).collect();
    let sent = send_batch(&mut busy, q, &payloads);

    let mut delivered = Vec::new();
    let settle = |client: &mut Client, batch: Vec<Delivery>, delivered: &mut Vec<i64>| {
        for delivery in batch {
            assert!(ack(client, q, delivery.id, delivery.token));
            delivered.push(delivery.id);
        }
    };
    let first = read(&mut busy, q, 10, None);
    assert_eq!(first.len(), 10);
    settle(&mut busy, first, &mut delivered);

    let mut tx = other.transaction().unwrap();
    let released: Vec<i64> = read(&mut tx, q, 10, None).iter().map(|d| d.id).collect();
    assert_eq!(released, sent[10..20], "the next ten, in order");
    let ahead = read(&mut busy, q, 10, None);
    assert_eq!(
        ahead.iter().map(|d| d.id).collect::<Vec<_>>(),
        sent[20..30],
        "the busy consumer skips what the other holds"
    );
    settle(&mut busy, ahead, &mut delivered);
    tx.rollback().unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered.len() < sent.len() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            missing(&sent, &delivered)
        );
        let batch = read(&mut busy, q, 10, None);
        settle(&mut busy, batch, &mut delivered);
    }
    delivered.sort_unstable();
    assert_eq!(delivered, sent, "each message delivered once");
    assert!(read(&mut busy, q, 10, None).is_empty());
}

/// Readers share where a queue's ready messages begin, so that each starts past what the others
/// hold. A reader that rolls back after moving that place takes it back: the messages it held are
/// what the next read gets, at once.
#[test]
fn a_rolled_back_reader_hands_its_messages_to_the_next_read_at_once() {
    let mut holder = connect();
    let mut other = connect();
    let queue = Queue::create(&mut holder, "rolled_back_shared", "");
    let q = queue.name.as_str();
    let payloads: Vec<Value> = (1..=30).map(|n| json!({ "n": n })).collect();
    let sent = send_batch(&mut holder, q, &payloads);
    let ids = |batch: Vec<Delivery>| batch.iter().map(|d| d.id).collect::<Vec<_>>();

    let mut tx = holder.transaction().unwrap();
    assert_eq!(ids(read(&mut tx, q, 10, None)), sent[0..10]);
    assert_eq!(
        ids(read(&mut other, q, 10, None)),
        sent[10..20],
        "past what the holder holds"
    );
    tx.rollback().unwrap();
    assert_eq!(
        ids(read(&mut connect(), q, 10, None)),
        sent[0..10],
        "what the rolled-back reader held comes first"
    );
}

fn missing(sent: &[i64], delivered: &[i64]) -> Vec<i64> {
    sent.iter()
        .filter(|id| !delivered.contains(id))
        .copied()
        .collect()
}
