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
