//! In-flight caps under concurrency: eight long-polling consumers on a queue capped at three, with
//! nacks, a consumer that vanishes mid-batch and a producer still sending. A watcher checks the whole
//! time that the queue never has more than three messages locked; every message is acked once. Then:
//! an ack wakes a reader waiting at the cap, and a waiting reader holds no slot.
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use bussig_tests::*;

const CAP: i64 = 3;
const UPFRONT: i64 = 150;
const LATER: i64 = 50;
const CONSUMERS: u64 = 8;

/// Messages of `queue` locked now.
fn locked_now(c: &mut Client, queue: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM bussig.message m JOIN bussig.queue q USING (queue_id)
         WHERE q.name = $1::text AND m.lock_token IS NOT NULL AND m.visible_at > clock_timestamp()",
        &[&queue],
    )
    .unwrap()
    .get(0)
}

/// `bussig.read` with a long poll of `wait` (interval text).
fn read_waiting(c: &mut Client, queue: &str, max: i32, wait: &str) -> Vec<(i64, uuid::Uuid)> {
    c.query(
        "SELECT message_id, lock_token FROM bussig.read($1::text, $2::int, wait => $3::text::interval)",
        &[&queue, &max, &wait],
    )
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

#[test]
fn a_capped_queue_never_has_more_locked_than_its_cap() {
    let mut admin = connect();
    let created = Queue::create(
        &mut admin,
        "inflight",
        &format!(
            "max_in_flight => {CAP}, lock_timeout => '500 milliseconds', max_deliveries => 1000"
        ),
    );
    let queue = created.name.clone();
    let payloads: Vec<_> = (0..UPFRONT).map(|i| json!(i)).collect();
    send_batch(&mut admin, &queue, &payloads);
    let done = AtomicBool::new(false);
    let most_locked = AtomicI64::new(0);
    let acked = Mutex::new(HashSet::new());
    let deadline = Instant::now() + Duration::from_secs(60);

    thread::scope(|scope| {
        scope.spawn(|| {
            let mut c = connect();
            while !done.load(Ordering::Relaxed) {
                most_locked.fetch_max(locked_now(&mut c, &queue), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
        });
        scope.spawn(|| {
            let mut c = connect();
            for i in UPFRONT..UPFRONT + LATER {
                send(&mut c, &queue, &json!(i));
                thread::sleep(Duration::from_millis(5));
            }
        });
        for k in 0..CONSUMERS {
            let (queue, acked, done) = (&queue, &acked, &done);
            scope.spawn(move || {
                let mut dice = Dice(0xCA9 + k);
                let mut c = connect();
                let mut vanished = false;
                while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let got =
                        read_waiting(&mut c, queue, 1 + dice.below(2) as i32, "200 milliseconds");
                    if k == 0 && !vanished && !got.is_empty() {
                        // Vanish mid-batch: the slots come free when the locks run out.
                        vanished = true;
                        c = connect();
                        continue;
                    }
                    for (id, token) in got {
                        thread::sleep(Duration::from_millis(dice.below(4)));
                        if dice.below(8) == 0 {
                            c.execute(
                                "SELECT bussig.nack($1::text, $2::bigint, $3::uuid, '0 seconds')",
                                &[queue, &id, &token],
                            )
                            .unwrap();
                        } else if ack(&mut c, queue, id, token) {
                            assert!(acked.lock().unwrap().insert(id), "message {id} acked twice");
                        }
                    }
                    if acked.lock().unwrap().len() as i64 == UPFRONT + LATER {
                        done.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(
        acked.lock().unwrap().len() as i64,
        UPFRONT + LATER,
        "every message acked before the deadline"
    );
    let most = most_locked.load(Ordering::Relaxed);
    assert!(most <= CAP, "{most} messages locked at once, cap {CAP}");
    assert!(most >= 2, "the consumers ran side by side ({most} at most)");
    assert_eq!(counts(&mut admin, &queue), (0, 0, 0));
}

#[test]
fn an_ack_wakes_a_reader_waiting_at_the_cap() {
    let mut admin = connect();
    let created = Queue::create(&mut admin, "inflight_wake", "max_in_flight => 1");
    let queue = created.name.clone();
    send_batch(&mut admin, &queue, &[json!(1), json!(2)]);
    let held = read_one(&mut admin, &queue).expect("the first message");
    let waiter = {
        let queue = queue.clone();
        thread::spawn(move || {
            let started = Instant::now();
            let got = read_waiting(&mut connect(), &queue, 1, "20 seconds");
            (got.len(), started.elapsed())
        })
    };
    thread::sleep(Duration::from_millis(300));
    assert!(
        !waiter.is_finished(),
        "the cap holds the second message back"
    );
    assert!(ack(&mut admin, &queue, held.id, held.token));
    let (got, waited) = waiter.join().unwrap();
    assert_eq!(got, 1);
    assert!(
        waited < Duration::from_secs(10),
        "woken by the ack, not by the end of its wait ({waited:?})"
    );
}

#[test]
fn a_reader_waiting_on_an_empty_capped_queue_holds_no_slot() {
    let mut admin = connect();
    let created = Queue::create(&mut admin, "inflight_idle", "max_in_flight => 2");
    let queue = created.name.clone();
    let waiter = {
        let queue = queue.clone();
        thread::spawn(move || read_waiting(&mut connect(), &queue, 2, "3 seconds").len())
    };
    thread::sleep(Duration::from_millis(500));
    assert!(!waiter.is_finished());
    let free: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT FROM bussig.in_flight_slot s JOIN bussig.queue q USING (queue_id)
                                   WHERE q.name = $1::text FOR UPDATE OF s SKIP LOCKED) free",
            &[&queue],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        free, 2,
        "the waiting reader let go of the slots its empty read claimed"
    );
    send(&mut admin, &queue, &json!("late"));
    assert_eq!(waiter.join().unwrap(), 1);
}

/// A read in a transaction block that goes on holds only the slots it used: the others are free for
/// other consumers at once, not when that transaction ends.
#[test]
fn a_read_in_an_open_transaction_holds_only_the_slots_it_used() {
    let mut admin = connect();
    let created = Queue::create(&mut admin, "inflight_block", "max_in_flight => 10");
    let queue = created.name.clone();
    send(&mut admin, &queue, &json!("first"));
    let mut holder = connect();
    let mut tx = holder.transaction().unwrap();
    assert_eq!(read(&mut tx, &queue, 10, None).len(), 1);
    let payloads: Vec<_> = (0..20).map(|i| json!(i)).collect();
    send_batch(&mut admin, &queue, &payloads);
    assert_eq!(
        read(&mut admin, &queue, 20, None).len(),
        9,
        "nine slots left beside the open transaction's one"
    );
    tx.commit().unwrap();
}

/// A purge frees the slots of the messages it deleted, not those of messages a read locked after the
/// purge's snapshot was taken (here: while the purge waited for a row another transaction held).
/// Freeing every slot let one more read past the cap while that message was still locked.
#[test]
fn a_purge_frees_only_the_slots_of_what_it_deleted() {
    let mut c = connect();
    let queue = Queue::create(&mut c, "in_flight_purge", "max_in_flight => 1");
    let q = queue.name.clone();
    let first = send(&mut c, &q, &json!(1));
    let mut holder = connect();
    holder.batch_execute("BEGIN").unwrap();
    holder
        .execute(
            "SELECT FROM bussig.message WHERE message_id = $1 FOR UPDATE",
            &[&first],
        )
        .unwrap();
    let purging = q.clone();
    let (mut purger, purger_pid) = watched_session();
    let purge = thread::spawn(move || {
        purger
            .query_one("SELECT bussig.purge_queue($1::text)", &[&purging])
            .map(|row| row.get::<_, i64>(0))
    });
    blocked_on_a_lock(&mut c, purger_pid, "the purge");
    // Sent and read after the purge's snapshot: the purge does not see it, and it keeps the slot.
    send(&mut c, &q, &json!(2));
    assert_eq!(read(&mut c, &q, 1, Some("1 hour")).len(), 1);
    holder.batch_execute("COMMIT").unwrap();
    assert_eq!(purge.join().unwrap().unwrap(), 1, "the purge deleted");
    assert_eq!(locked_now(&mut c, &q), 1);
    send(&mut c, &q, &json!(3));
    assert_eq!(
        read(&mut c, &q, 1, None).len(),
        0,
        "a read went past the cap of 1"
    );
}
