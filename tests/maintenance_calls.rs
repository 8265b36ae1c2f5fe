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

/// What one `run_maintenance()` call's orphan step removed.
fn orphans_removed(admin: &mut Client) -> i64 {
    admin
        .query_one(
            "SELECT (bussig.run_maintenance() ->> 'removed_orphans')::bigint",
            &[],
        )
        .unwrap()
        .get(0)
}

/// A send that began before its queue's drop and commits long after it leaves a message nobody can
/// read. It used to stay for good when the send committed over a minute after the drop: by then the
/// worker had forgotten the drop. The drop is kept while a transaction older than the worker's notice
/// of it is open, and the message goes once that one has ended.
#[test]
fn a_send_committed_long_after_its_queues_drop_leaves_no_message_behind() {
    let (db, mut admin) = Database::without_worker("late_orphan");
    admin
        .batch_execute("SELECT bussig.create_queue('raced')")
        .unwrap();
    let queue_id: i32 = admin
        .query_one(
            "SELECT queue_id FROM bussig.queue WHERE name = 'raced'",
            &[],
        )
        .unwrap()
        .get(0);
    let mut sender = db.connect();
    sender.batch_execute("BEGIN").unwrap();
    sender
        .execute("SELECT bussig.send('raced', '\"late\"')", &[])
        .unwrap();
    admin
        .batch_execute("SELECT bussig.drop_queue('raced')")
        .unwrap();
    assert_eq!(orphans_removed(&mut admin), 0, "the round that notices it");
    // Over a minute since the drop, as far as the worker can tell.
    admin
        .batch_execute(
            "UPDATE bussig.dropped_queue SET dropped_at = dropped_at - interval '2 minutes'",
        )
        .unwrap();
    for _ in 0..3 {
        assert_eq!(orphans_removed(&mut admin), 0, "nothing committed yet");
    }
    let kept: i64 = admin
        .query_one(
            "SELECT count(*) FROM bussig.dropped_queue WHERE queue_id = $1",
            &[&queue_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        kept, 1,
        "the drop was forgotten while a send that raced it was open"
    );
    sender.batch_execute("COMMIT").unwrap();
    // A transaction-long snapshot would not see the late send's message: nothing is settled in it.
    admin
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .unwrap();
    assert_eq!(orphans_removed(&mut admin), 0, "under REPEATABLE READ");
    admin.batch_execute("COMMIT").unwrap();
    assert_eq!(orphans_removed(&mut admin), 1, "the late send's message");
    let (messages, drops): (i64, i64) = {
        let row = admin
            .query_one(
                "SELECT (SELECT count(*) FROM bussig.message WHERE queue_id = $1),
                        (SELECT count(*) FROM bussig.dropped_queue WHERE queue_id = $1)",
                &[&queue_id],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((messages, drops), (0, 0));
}
