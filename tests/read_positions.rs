//! Readers share where a queue's ready messages begin (design.md, "Reading through a backlog"), and a
//! read from there that comes up short has found all there was. So whatever makes a message ready
//! behind that place moves it back first: each test makes a message ready behind a fresh position
//! the way users do, and checks that the very next read gets it. The last shows what it is for: under
//! a held snapshot, reads do not walk the dead entries of every message consumed since it began.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bussig_tests::*;

fn ids(batch: Vec<Delivery>) -> Vec<i64> {
    batch.iter().map(|d| d.id).collect()
}

fn numbers(count: i32) -> Vec<serde_json::Value> {
    (1..=count).map(|n| json!({ "n": n })).collect()
}

fn ack_all(c: &mut impl GenericClient, queue: &str, batch: &[Delivery]) {
    assert_eq!(ack_batch(c, queue, batch), batch.len() as i64);
}

/// Sends `payload` to `queue` in a transaction prepared for COMMIT PREPARED: its global id.
fn prepare_send(queue: &str, payload: &str) -> String {
    let gid = format!("{queue}-send");
    connect()
        .batch_execute(&format!(
            "BEGIN; SELECT bussig.send('{queue}', '{payload}'); PREPARE TRANSACTION '{gid}'"
        ))
        .unwrap();
    gid
}

/// A send is ready from when it is written, but seen only from its commit: a later send can be read
/// first, and the position move past the earlier one. Its commit moves the position back.
#[test]
fn a_send_that_commits_after_a_later_one_was_read_is_delivered_at_once() {
    let mut admin = connect();
    let mut late = connect();
    let mut reader = connect();
    let queue = Queue::create(&mut admin, "late_commit", "");
    let q = queue.name.as_str();

    let mut tx = late.transaction().unwrap();
    let early = send(&mut tx, q, &json!({ "n": 1 }));
    let later = send_batch(&mut admin, q, &numbers(2));
    assert_eq!(ids(read(&mut reader, q, 1, None)), [later[0]]);
    tx.commit().unwrap();
    assert_eq!(
        ids(read(&mut reader, q, 10, None)),
        [early, later[1]],
        "the late commit's message, in its place in delivery order"
    );
}

/// COMMIT PREPARED runs in another session, which knows nothing of the messages: nothing moves the
/// position back for them. They are still delivered, by the read from the head that checks once the
/// position's lifetime (1 s) is over.
#[test]
fn a_send_committed_by_commit_prepared_is_delivered_within_the_positions_lifetime() {
    let mut admin = connect();
    let mut reader = connect();
    let queue = Queue::create(&mut admin, "prepared_send", "");
    let q = queue.name.as_str();
    let gid = prepare_send(q, r#"{"n": 1}"#);
    let later = send_batch(&mut admin, q, &numbers(2));
    assert_eq!(ids(read(&mut reader, q, 1, None)), [later[0]]);
    admin
        .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
        .unwrap();
    let mut delivered = ids(read(&mut reader, q, 10, None));
    let started = Instant::now();
    while delivered.len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still missing after 5 s: {delivered:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
        delivered.extend(ids(read(&mut reader, q, 10, None)));
    }
    assert!(delivered.contains(&later[1]));
    assert_eq!(delivered.len(), 2, "each once: {delivered:?}");
}

/// A reader whose transaction outlives its lock commits without settling: its message is ready again
/// from its lock's end, behind where other reads, which skipped the row it held, moved the position.
/// The commit forgets the position.
#[test]
fn a_reader_that_outlives_its_lock_hands_its_message_to_the_next_read_at_once() {
    let mut admin = connect();
    let mut slow = connect();
    let mut other = connect();
    let queue = Queue::create(&mut admin, "outlived_lock", "");
    let q = queue.name.as_str();
    let sent = send_batch(&mut admin, q, &numbers(2));

    let mut tx = slow.transaction().unwrap();
    assert_eq!(
        ids(read(&mut tx, q, 1, Some("200 milliseconds"))),
        [sent[0]]
    );
    assert_eq!(ids(read(&mut other, q, 1, None)), [sent[1]]);
    std::thread::sleep(Duration::from_millis(300));
    let later = send(&mut admin, q, &json!({ "n": 3 }));
    assert_eq!(
        ids(read(&mut other, q, 1, None)),
        [later],
        "the row the slow reader holds is skipped"
    );
    tx.commit().unwrap();
    assert_eq!(
        ids(read(&mut connect(), q, 10, None)),
        [sent[0]],
        "ready again since its lock ended, and read at once"
    );
}

/// Readers that keep finding messages keep the position moving, but not alive: it expires a second
/// after it was set, and one of them reads from the head. That finds what nothing moved the position
/// back for (here a COMMIT PREPARED's message) while a producer keeps the queue full.
#[test]
fn readers_that_keep_finding_messages_still_check_from_the_head() {
    const READERS: usize = 4;
    let mut admin = connect();
    let queue = Queue::create(&mut admin, "checked_under_load", "");
    let q = queue.name.clone();
    let gid = prepare_send(&q, r#"{"prepared": true}"#);
    send_batch(&mut admin, &q, &numbers(1_000));
    let mut warm_up = connect();
    let first = read(&mut warm_up, &q, 10, None);
    ack_all(&mut warm_up, &q, &first);
    admin
        .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
        .unwrap();
    let committed = Instant::now();
    let found = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut producer = connect();
            while !found.load(Ordering::SeqCst) && committed.elapsed() < Duration::from_secs(10) {
                send_batch(&mut producer, &q, &numbers(200));
            }
        });
        for _ in 0..READERS {
            scope.spawn(|| {
                let mut c = connect();
                while !found.load(Ordering::SeqCst) && committed.elapsed() < Duration::from_secs(10)
                {
                    let batch = read(&mut c, &q, 10, None);
                    ack_all(&mut c, &q, &batch);
                    if batch.iter().any(|d| d.payload.get("prepared").is_some()) {
                        found.store(true, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert!(found.load(Ordering::SeqCst), "not read within 10 s");
}

/// A reader that rolls back to a savepoint hands back what it read since: the next read gets those
/// messages, though another reader moved the position past them meanwhile.
#[test]
fn a_rolled_back_savepoint_hands_its_messages_to_the_next_read_at_once() {
    let mut holder = connect();
    let mut other = connect();
    let queue = Queue::create(&mut holder, "savepoint_back", "");
    let q = queue.name.as_str();
    let sent = send_batch(&mut holder, q, &numbers(30));

    let mut tx = holder.transaction().unwrap();
    assert_eq!(ids(read(&mut tx, q, 5, None)), sent[0..5]);
    tx.batch_execute("SAVEPOINT before_more").unwrap();
    assert_eq!(ids(read(&mut tx, q, 5, None)), sent[5..10]);
    assert_eq!(ids(read(&mut other, q, 10, None)), sent[10..20]);
    tx.batch_execute("ROLLBACK TO SAVEPOINT before_more")
        .unwrap();
    assert_eq!(
        ids(read(&mut connect(), q, 5, None)),
        sent[5..10],
        "what the savepoint held comes first"
    );
    tx.commit().unwrap();
}

/// Under a held snapshot no dead index entry can be removed or marked, so a read from the head of a
/// queue steps over one for every message consumed since the snapshot was taken. Reads that come up
/// short (a queue kept nearly empty) start where the ready messages are instead: but for the one read
/// in a while that checks from the head, each reads a few pages, not thousands.
#[test]
fn short_reads_under_a_held_snapshot_start_where_the_ready_messages_are() {
    const CONSUMED: i32 = 20_000;
    const ROUNDS: usize = 20;
    /// Pages a short read may fetch: its own work is 16 to 34 here; from the head, 370 after 10,000
    /// messages consumed.
    const PAGES: i64 = 100;

    let mut admin = connect();
    let mut holder = connect();
    let mut c = connect();
    let queue = Queue::create(&mut admin, "held_snapshot_reads", "");
    let q = queue.name.as_str();
    let mut held = holder.transaction().unwrap();
    held.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; SELECT txid_current()")
        .unwrap();

    for _ in 0..CONSUMED / 1_000 {
        send_batch(&mut c, q, &numbers(1_000));
    }
    let mut consumed = 0;
    while consumed < CONSUMED {
        let batch = read(&mut c, q, 100, None);
        assert!(!batch.is_empty(), "{consumed} of {CONSUMED} consumed");
        ack_all(&mut c, q, &batch);
        consumed += batch.len() as i32;
    }

    let mut walks = Vec::new();
    for round in 0..ROUNDS {
        let sent = send(&mut c, q, &json!({ "round": round }));
        let mut tx = c.transaction().unwrap();
        let before = message_visits(&mut tx).1;
        let batch = read(&mut tx, q, 10, None);
        let pages = message_visits(&mut tx).1 - before;
        assert_eq!(ids(batch.clone()), [sent], "round {round}");
        ack_all(&mut tx, q, &batch);
        tx.commit().unwrap();
        if pages > PAGES {
            walks.push(pages);
        }
    }
    assert!(
        walks.len() <= 3,
        "{} of {ROUNDS} short reads walked from the head: {walks:?} pages",
        walks.len()
    );
    held.rollback().unwrap();
}
