//! `bussig.run_maintenance()` called by several sessions at once, beside the worker's rounds and
//! senders: every call succeeds. Its steps and the worker's write the same queues' counts; two of
//! them upserting those rows in different orders deadlocked (40P01) in most calls of a `pgbench` run
//! of four callers, and once in a fresh-clone `make test`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bussig_tests::*;

const QUEUES: i32 = 100;
const CALLERS: usize = 4;
const FOR: Duration = Duration::from_secs(4);

#[test]
fn concurrent_maintenance_calls_beside_the_worker_and_senders_all_succeed() {
    let db = Database::create("maintenance_calls");
    let mut admin = db.connect();
    admin
        .batch_execute(&format!(
            "CREATE EXTENSION bussig;
             SELECT bussig.create_queue('q' || i) FROM generate_series(1, {QUEUES}) i;"
        ))
        .unwrap();
    let sending = AtomicBool::new(true);
    let (calls, failures) = thread::scope(|scope| {
        let sending = &sending;
        let db = &db;
        for s in 0..2 {
            scope.spawn(move || {
                let mut c = db.connect();
                let mut n: i32 = s;
                while sending.load(Ordering::SeqCst) {
                    c.execute(
                        "SELECT bussig.send('q' || $1::int, '{\"n\": 1}')",
                        &[&(n % QUEUES + 1)],
                    )
                    .unwrap();
                    n += 7;
                }
            });
        }
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                scope.spawn(move || {
                    let mut c = db.connect();
                    let (mut calls, mut failures) = (0, Vec::new());
                    let started = Instant::now();
                    while started.elapsed() < FOR {
                        calls += 1;
                        if let Err(e) = c.execute("SELECT bussig.run_maintenance()", &[]) {
                            failures.push(format!("{e:?}"));
                        }
                    }
                    (calls, failures)
                })
            })
            .collect();
        let results: Vec<(usize, Vec<String>)> =
            callers.into_iter().map(|h| h.join().unwrap()).collect();
        sending.store(false, Ordering::SeqCst);
        results
            .into_iter()
            .fold((0, Vec::new()), |(calls, mut all), (n, failures)| {
                all.extend(failures);
                (calls + n, all)
            })
    });
    assert!(calls >= CALLERS, "every caller called");
    assert!(
        failures.is_empty(),
        "{} of {calls} run_maintenance calls failed, the first: {}",
        failures.len(),
        failures[0]
    );
}

/// Two ephemeral queues past their heartbeat: one's message is held by a consumer idle in its
/// transaction. The other is dropped at once; the held one once the consumer's transaction ends.
/// The held one's lock wait failed the whole step before, every round, so neither went.
#[test]
fn an_expired_ephemeral_queue_in_use_does_not_hold_back_the_others() {
    let (database, mut c) = Database::without_worker("maintenance_ephemeral");
    let subject = "maintenance.ephemeral";
    for queue in ["eph_held", "eph_free"] {
        c.execute(
            "SELECT bussig.subscribe($1::text, $2::text, ttl => '1 second')",
            &[&queue, &format!("{subject}.{queue}")],
        )
        .unwrap();
    }
    c.execute(
        "SELECT bussig.publish($1::text, '{\"held\": true}')",
        &[&format!("{subject}.eph_held")],
    )
    .unwrap();
    let mut consumer = database.connect();
    consumer.batch_execute("BEGIN").unwrap();
    assert_eq!(read(&mut consumer, "eph_held", 1, None).len(), 1);
    thread::sleep(Duration::from_millis(1500));
    c.batch_execute("SET statement_timeout = '20s'").unwrap();
    let dropped = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT (bussig.run_maintenance() ->> 'dropped_queues')::bigint",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(dropped(&mut c), 1, "the free queue was not dropped");
    let left: Vec<String> = c
        .query(
            "SELECT queue FROM bussig.queues WHERE queue LIKE 'eph_%' ORDER BY queue",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    // The held queue, with the dead-letter queue made for it.
    assert_eq!(
        left,
        vec!["eph_held".to_string(), "eph_held_dlq".to_string()]
    );
    consumer.batch_execute("COMMIT").unwrap();
    assert_eq!(
        dropped(&mut c),
        1,
        "the held queue was not dropped once free"
    );
}
