//! Many consumers drain a queue while producers keep adding to it: every
//! message is acked exactly once and no two consumers ever hold the same one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use bussig_tests::*;

const PREFILL: i64 = 10_000;
const PRODUCERS: i64 = 2;
const PER_PRODUCER: i64 = 5_000;
const ROUND: i64 = 50; // each producer round: one send_batch of ROUND-1, one send
const CONSUMERS: usize = 8;
const READ_BATCH: i32 = 10;
const TOTAL: i64 = PREFILL + PRODUCERS * PER_PRODUCER;

/// State the threads share. Payloads are `{"n": k}` with k unique in 0..TOTAL.
struct Shared {
    queue: String,
    deadline: Instant,
    producers_left: AtomicUsize,
    sent: Mutex<HashSet<i64>>,
    held: Mutex<HashSet<i64>>,
    acked: Mutex<HashMap<i64, i64>>, // message id -> n
}

/// Locks without cascading poison: the first panic is the one worth reading.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn record_sent(shared: &Shared, ids: &[i64]) {
    let mut sent = lock(&shared.sent);
    for id in ids {
        assert!(sent.insert(*id), "send returned id {id} twice");
    }
}

/// Marks the producer done even if it panics, so consumers can still stop.
struct ProducerDone<'a>(&'a AtomicUsize);
impl Drop for ProducerDone<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn produce(shared: &Shared, producer: i64) {
    let _done = ProducerDone(&shared.producers_left);
    let mut c = connect();
    let first = PREFILL + producer * PER_PRODUCER;
    for start in (first..first + PER_PRODUCER).step_by(ROUND as usize) {
        let payloads: Vec<_> = (start..start + ROUND - 1)
            .map(|n| json!({ "n": n }))
            .collect();
        let ids = send_batch(&mut c, &shared.queue, &payloads);
        assert_eq!(
            ids.len(),
            payloads.len(),
            "send_batch returned the wrong number of ids"
        );
        record_sent(shared, &ids);
        let id = send(&mut c, &shared.queue, &json!({ "n": start + ROUND - 1 }));
        record_sent(shared, &[id]);
    }
}

fn consume(shared: &Shared) {
    let mut c = connect();
    loop {
        assert!(
            Instant::now() < shared.deadline,
            "drain did not finish in time"
        );
        // Read the flag before reading: an empty read after that means all sends are visible.
        let producers_done = shared.producers_left.load(Ordering::SeqCst) == 0;
        let batch = read(&mut c, &shared.queue, READ_BATCH, None);
        if batch.is_empty() {
            if producers_done {
                return;
            }
            thread::sleep(Duration::from_millis(2)); // back off while producers catch up
            continue;
        }

        let doubly_held: Vec<i64> = {
            let mut held = lock(&shared.held);
            batch
                .iter()
                .filter(|d| !held.insert(d.id))
                .map(|d| d.id)
                .collect()
        };
        assert!(
            doubly_held.is_empty(),
            "held by two consumers at once: {doubly_held:?}"
        );

        let mut tx = c.transaction().expect("begin");
        for d in &batch {
            assert_eq!(d.delivery_count, 1, "message {} was redelivered", d.id);
            assert!(
                ack(&mut tx, &shared.queue, d.id, d.token),
                "ack({}) returned false",
                d.id
            );
        }
        tx.commit().expect("commit acks");

        let mut acked = lock(&shared.acked);
        let mut held = lock(&shared.held);
        for d in &batch {
            let n = d.payload["n"].as_i64().expect("payload has n");
            assert!(
                acked.insert(d.id, n).is_none(),
                "message {} acked twice",
                d.id
            );
            held.remove(&d.id);
        }
    }
}

#[test]
fn concurrent_drain() {
    let mut client = connect();
    // A long lock timeout: any redelivery here would be a bug, not an expiry.
    let queue = Queue::create(
        &mut client,
        "concurrent_drain",
        "lock_timeout => '5 minutes'",
    );
    let shared = Shared {
        queue: queue.name.clone(),
        // A bound against a hang, not a timing: 9 s direct and 20 s through pgbouncer on a busy
        // 2-core machine, past 50 s there once with a 128-consumer benchmark beside it.
        deadline: Instant::now() + Duration::from_secs(150),
        producers_left: AtomicUsize::new(PRODUCERS as usize),
        sent: Mutex::default(),
        held: Mutex::default(),
        acked: Mutex::default(),
    };

    for start in (0..PREFILL).step_by(500) {
        let payloads: Vec<_> = (start..start + 500).map(|n| json!({ "n": n })).collect();
        let ids = send_batch(&mut client, &queue.name, &payloads);
        assert_eq!(
            ids.len(),
            payloads.len(),
            "send_batch returned the wrong number of ids"
        );
        record_sent(&shared, &ids);
    }

    thread::scope(|s| {
        for p in 0..PRODUCERS {
            let shared = &shared;
            s.spawn(move || produce(shared, p));
        }
        for _ in 0..CONSUMERS {
            s.spawn(|| consume(&shared));
        }
    });

    let sent = lock(&shared.sent);
    let acked = lock(&shared.acked);
    assert_eq!(sent.len() as i64, TOTAL, "not every send returned an id");
    let acked_ids: HashSet<i64> = acked.keys().copied().collect();
    assert_eq!(
        acked_ids.len(),
        sent.len(),
        "acked {} of {} messages",
        acked.len(),
        sent.len()
    );
    assert!(acked_ids == *sent, "the acked ids are not the sent ids");
    let mut ns: Vec<i64> = acked.values().copied().collect();
    ns.sort_unstable();
    assert!(ns.into_iter().eq(0..TOTAL), "payloads lost or duplicated");
    assert!(
        lock(&shared.held).is_empty(),
        "messages still held after the drain"
    );

    assert!(
        peek(&mut client, &queue.name).is_empty(),
        "messages left in the queue"
    );
    assert_eq!(counts(&mut client, &queue.name), (0, 0, 0));
}
