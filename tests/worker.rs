//! The background worker does maintenance on its own, every
//! `bussig.maintenance_interval`: it dead-letters expired messages and
//! messages whose last allowed delivery ran out, and drops ephemeral queues
//! nobody heartbeats. Nothing here calls `bussig.run_maintenance()`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bussig_tests::*;

const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `dlq` until it holds message `id`; returns that message.
fn wait_for_dead_letter(client: &mut Client, dlq: &str, id: i64, what: &str) -> Peeked {
    eventually(DEADLINE, what, || {
        peek(client, dlq).into_iter().find(|m| m.id == id)
    })
}

fn queue_exists(client: &mut Client, queue: &str) -> bool {
    client
        .query_one(
            "SELECT count(*) > 0 FROM bussig.queues WHERE queue = $1",
            &[&queue],
        )
        .unwrap()
        .get(0)
}

fn subscription_count(client: &mut Client, queue: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM bussig.subscriptions WHERE queue = $1",
            &[&queue],
        )
        .unwrap()
        .get(0)
}

#[test]
fn worker_is_running_for_this_database() {
    let mut client = connect();
    let workers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE backend_type = 'bussig worker' AND datname = current_database()",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(workers, 1, "bussig worker rows for this database");
    let launchers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'bussig launcher'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(launchers, 1, "bussig launcher rows");
}

/// One worker per database with the extension: the launcher starts a worker
/// once per database (one without the extension sees it exit and is retried
/// much later), not in a loop. Watched for 3 s, no database may see more than
/// a few distinct worker processes.
#[test]
fn launcher_does_not_restart_workers_in_a_loop() {
    let mut client = connect();
    let mut seen: std::collections::BTreeMap<String, std::collections::BTreeSet<i32>> =
        Default::default();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for row in client
            .query(
                "SELECT coalesce(datname, ''), pid FROM pg_stat_activity \
                 WHERE backend_type = 'bussig worker'",
                &[],
            )
            .unwrap()
        {
            seen.entry(row.get(0)).or_default().insert(row.get(1));
        }
        thread::sleep(Duration::from_millis(10));
    }
    let database: String = client
        .query_one("SELECT current_database()", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        seen.get(&database).map(|pids| pids.len()),
        Some(1),
        "this database's worker processes over 3 s: {seen:?}"
    );
    for (database, pids) in &seen {
        assert!(
            pids.len() <= 3,
            "{} bussig worker processes came and went in database {database:?} within 3 s: {pids:?}",
            pids.len()
        );
    }
}

#[test]
fn expired_message_is_dead_lettered_by_the_worker() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "worker_ttl", "message_ttl => '1 second'");
    let q = queue.name.as_str();
    let id: i64 = client
        .query_one(
            "SELECT bussig.send($1::text, '{\"k\": \"expires\"}', headers => '{\"h\": 1}')",
            &[&q],
        )
        .unwrap()
        .get(0);

    let dead = wait_for_dead_letter(
        &mut client,
        &queue.dlq(),
        id,
        "the worker to dead-letter the expired message",
    );
    assert_eq!(
        header(&dead.headers, "bussig-dead-letter-reason"),
        Some("expired"),
        "{dead:?}"
    );
    assert_eq!(header(&dead.headers, "bussig-source-queue"), Some(q));
    assert_eq!(
        dead.headers.as_ref().and_then(|h| h.get("h")),
        Some(&json!(1))
    );
    assert_eq!(dead.payload, json!({ "k": "expires" }));
    assert_eq!(
        counts(&mut client, q),
        (0, 0, 0),
        "the expired message is gone"
    );
}

#[test]
fn lock_running_out_on_last_delivery_dead_letters() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "worker_maxdel", "max_deliveries => 1");
    let q = queue.name.as_str();
    let id = send(&mut client, q, &json!({ "k": "once" }));
    let delivered = read(&mut client, q, 1, Some("1 second"));
    assert_eq!(delivered.len(), 1);
    assert_eq!((delivered[0].id, delivered[0].delivery_count), (id, 1));

    // Nobody reads the queue again: the worker alone must move it.
    let dead = wait_for_dead_letter(
        &mut client,
        &queue.dlq(),
        id,
        "the worker to dead-letter the message whose last lock ran out",
    );
    assert_eq!(
        header(&dead.headers, "bussig-dead-letter-reason"),
        Some("max_deliveries"),
        "{dead:?}"
    );
    assert_eq!(header(&dead.headers, "bussig-source-queue"), Some(q));
    assert_eq!(dead.payload, json!({ "k": "once" }));
    assert_eq!(
        counts(&mut client, q),
        (0, 0, 0),
        "the message left its queue"
    );
    assert!(
        !ack(&mut client, q, id, delivered[0].token),
        "a dead-lettered message was acked in its old queue"
    );
}

#[test]
fn ephemeral_queue_without_heartbeat_is_dropped() {
    let mut client = connect();
    let p = unique_name("worker_eph");
    let idle = Queue {
        name: unique_name("worker_eph_idle"),
    };
    let alive = Queue {
        name: unique_name("worker_eph_alive"),
    };
    let idle_subject = format!("{p}.eph.x");
    let alive_subject = format!("{p}.eph.y");

    let new: bool = client
        .query_one(
            "SELECT bussig.subscribe($1::text, $2::text, ttl => '2 seconds')",
            &[&idle.name, &idle_subject],
        )
        .unwrap()
        .get(0);
    assert!(new, "subscribe to a new ephemeral queue");
    let alive_created = Instant::now();
    let new: bool = client
        .query_one(
            "SELECT bussig.subscribe($1::text, $2::text, ttl => '2 seconds')",
            &[&alive.name, &alive_subject],
        )
        .unwrap()
        .get(0);
    assert!(new);

    // Heartbeats for one of them, every 500 ms, from their own connection.
    let stop = Arc::new(AtomicBool::new(false));
    let beats = {
        let (stop, name) = (stop.clone(), alive.name.clone());
        thread::spawn(move || {
            let mut c = connect();
            while !stop.load(Ordering::Relaxed) {
                let ok: bool = c
                    .query_one("SELECT bussig.heartbeat($1::text)", &[&name])
                    .expect("heartbeat")
                    .get(0);
                assert!(
                    ok,
                    "heartbeat({name}) on a live ephemeral queue returned false"
                );
                thread::sleep(Duration::from_millis(500));
            }
        })
    };

    // Both are listed with an expiry; the idle one gets a message.
    let expiring: i64 = client
        .query_one(
            "SELECT count(*) FROM bussig.subscriptions \
             WHERE queue IN ($1, $2) AND expires_at IS NOT NULL",
            &[&idle.name, &alive.name],
        )
        .unwrap()
        .get(0);
    assert_eq!(expiring, 2, "both ephemeral subscriptions show expires_at");
    let reached: i32 = client
        .query_one("SELECT bussig.publish($1::text, '{}')", &[&idle_subject])
        .unwrap()
        .get(0);
    assert_eq!(reached, 1);
    assert!(
        queue_exists(&mut client, &idle.dlq()),
        "subscribe created {}",
        idle.dlq()
    );

    // The idle queue goes, with its subscriptions, messages and dead-letter queue.
    eventually(
        DEADLINE,
        "the worker to drop the idle ephemeral queue",
        || (!queue_exists(&mut client, &idle.name)).then_some(()),
    );
    assert_eq!(subscription_count(&mut client, &idle.name), 0);
    assert!(
        !queue_exists(&mut client, &idle.dlq()),
        "{} outlived its ephemeral queue",
        idle.dlq()
    );
    let reached: i32 = client
        .query_one("SELECT bussig.publish($1::text, '{}')", &[&idle_subject])
        .unwrap()
        .get(0);
    assert_eq!(
        reached, 0,
        "a dropped ephemeral queue still receives messages"
    );

    // The heartbeated one stays, well past several of its ttls.
    let outlive = Duration::from_secs(7);
    eventually(
        outlive + DEADLINE,
        "the heartbeated queue to outlive three of its ttls",
        || {
            assert!(
                queue_exists(&mut client, &alive.name),
                "the heartbeated ephemeral queue was dropped after {:?}",
                alive_created.elapsed()
            );
            assert_eq!(subscription_count(&mut client, &alive.name), 1);
            (alive_created.elapsed() >= outlive).then_some(())
        },
    );

    // Without heartbeats it goes too.
    stop.store(true, Ordering::Relaxed);
    beats.join().expect("heartbeat thread");
    eventually(
        DEADLINE,
        "the worker to drop the ephemeral queue after its heartbeats stopped",
        || (!queue_exists(&mut client, &alive.name)).then_some(()),
    );
    assert_eq!(subscription_count(&mut client, &alive.name), 0);
}

#[test]
fn a_bloated_message_table_is_rewritten_small() {
    let mut c = connect();
    let queue = Queue::create(&mut c, "worker_compaction", "");
    // About 20 MB of messages, then none: the table is almost all dead space.
    c.execute(
        "SELECT count(*) FROM bussig.send_batch($1::text,
             (SELECT array_agg(jsonb_build_object('n', i, 'pad', repeat('x', 300))) FROM generate_series(1, 60000) i))",
        &[&queue.name],
    )
    .unwrap();
    let bloated = message_table_size(&mut c);
    assert!(bloated > 16 << 20, "only {bloated} bytes written");
    c.execute("SELECT bussig.purge_queue($1::text)", &[&queue.name])
        .unwrap();
    eventually(
        Duration::from_secs(120),
        "the message table to be rewritten",
        || {
            let now = message_table_size(&mut c);
            (now < bloated / 4).then_some(())
        },
    );
}

/// A database of its own, its worker kept out, whose message table held `gone` times 10,000 messages
/// of queue 'gone', purged, and holds `live` times 10,000 of queue 'live'.
fn bloated_database(test: &str, gone: i32, live: i32) -> (Database, Client) {
    let (database, mut c) = Database::without_worker(test);
    c.batch_execute(&format!(
        "SELECT bussig.create_queue('live'), bussig.create_queue('gone');
         SELECT count(*) FROM (SELECT bussig.send_batch('gone', array_fill('{{\"pad\": 1}}'::jsonb, ARRAY[10000]))
                               FROM generate_series(1, {gone})) s;
         SELECT count(*) FROM (SELECT bussig.send_batch('live', array_fill('{{\"pad\": 1}}'::jsonb, ARRAY[10000]))
                               FROM generate_series(1, {live})) s;
         SELECT bussig.purge_queue('gone');"
    ))
    .unwrap();
    (database, c)
}

/// One maintenance round: how many tables it rewrote.
fn compacted(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT (bussig.run_maintenance() ->> 'compacted_tables')::bigint",
        &[],
    )
    .unwrap()
    .get(0)
}

fn message_table_file(c: &mut Client) -> i64 {
    c.query_one("SELECT pg_relation_filenode('bussig.message')::bigint", &[])
        .unwrap()
        .get(0)
}

fn message_table_size(c: &mut Client) -> i64 {
    c.query_one("SELECT pg_relation_size('bussig.message')", &[])
        .unwrap()
        .get(0)
}

/// A rewrite holds every sender and reader of the table while it copies the live rows: a table with
/// more than 40,000 of them is left to VACUUM, however bloated (see maintenance.rs).
#[test]
fn a_bloated_table_with_many_live_messages_is_not_rewritten() {
    let (_database, mut c) = bloated_database("compaction_live", 60, 5);
    let bloated = message_table_size(&mut c);
    assert!(bloated > 10 * 50_000 * 100, "only {bloated} bytes written");
    assert_eq!(compacted(&mut c), 0, "50,000 live messages, rewritten");
    assert_eq!(message_table_size(&mut c), bloated);
    assert_eq!(counts(&mut c, "live").0, 50_000);
}

/// Long-polling readers sleep holding no lock on the message table, so that the rewrite, which takes
/// the table only when it is free, finds it free between their reads: plain reads, `ack_and_read`
/// with no acks, and reads of a queue with a cap on messages in flight.
#[test]
fn a_bloated_table_is_rewritten_while_readers_long_poll() {
    let (database, mut c) = bloated_database("compaction_pollers", 15, 0);
    c.batch_execute("SELECT bussig.create_queue('capped', max_in_flight => 2)")
        .unwrap();
    let bloated = message_table_size(&mut c);
    assert!(bloated > 8 << 20, "only {bloated} bytes written");
    let file_before = message_table_file(&mut c);
    let waits = [
        "SELECT count(*) FROM bussig.read('live', 10, wait => '6 seconds')",
        "SELECT count(*) FROM bussig.read('live', 10, wait => '6 seconds')",
        "SELECT count(*) FROM bussig.ack_and_read('live', '{}', '{}', 10, wait => '6 seconds')",
        "SELECT count(*) FROM bussig.read('capped', 10, wait => '6 seconds')",
        "SELECT count(*) FROM bussig.ack_and_read('capped', '{}', '{}', 10, wait => '6 seconds')",
    ];
    let readers: Vec<_> = waits
        .iter()
        .map(|&wait| {
            let mut reader = database.connect();
            thread::spawn(move || reader.query_one(wait, &[]).map(|row| row.get::<_, i64>(0)))
        })
        .collect();
    eventually(DEADLINE, "every reader asleep in its wait", || {
        let asleep: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Extension'
                   AND query LIKE '%wait => %'",
                &[],
            )
            .unwrap()
            .get(0);
        (asleep == waits.len() as i64).then_some(())
    });
    assert_eq!(
        compacted(&mut c),
        1,
        "the rewrite did not find the table free"
    );
    // Rewritten (a new file). How small it came out depends on the snapshots of other tests.
    assert_ne!(message_table_file(&mut c), file_before);
    for reader in readers {
        assert_eq!(
            reader.join().unwrap().unwrap(),
            0,
            "a reader found messages"
        );
    }
}

/// The rewrite waits for the table's lock at most 50 ms: a transaction that holds the table longer
/// leaves it for a later round, which then rewrites it.
#[test]
fn a_bloated_table_in_use_is_left_for_a_later_round() {
    let (database, mut c) = bloated_database("compaction_busy", 15, 0);
    let mut holder = database.connect();
    holder
        .batch_execute("BEGIN; SELECT bussig.send('live', '1')")
        .unwrap();
    assert_eq!(
        compacted(&mut c),
        0,
        "rewritten under a lock held throughout"
    );
    holder.batch_execute("COMMIT").unwrap();
    assert_eq!(
        compacted(&mut c),
        1,
        "not rewritten once the table was free"
    );
}

/// A maintenance call whose own transaction wrote to the message table comes to rewrite it while
/// another transaction, which holds the table too, already waits for it in ACCESS EXCLUSIVE mode:
/// PostgreSQL reports the deadlock at once to the one that asks second. The rewrite gives up, as
/// after its wait, instead of failing the call (CI: 40P01 from a run_maintenance beside the worker,
/// whose compaction waited for the table).
#[test]
fn a_rewrite_that_would_deadlock_is_left_for_a_later_round() {
    let (database, mut c) = bloated_database("compaction_deadlock", 15, 0);
    c.batch_execute("BEGIN; SELECT bussig.send('live', '1')")
        .unwrap();
    let mut other = database.connect();
    let waiting = thread::spawn(move || {
        other.batch_execute(
            "BEGIN; SELECT count(*) FROM bussig.message;
             LOCK TABLE bussig.message IN ACCESS EXCLUSIVE MODE; COMMIT",
        )
    });
    eventually(
        DEADLINE,
        "the other transaction waiting for the table",
        || {
            let waits: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_locks
                 WHERE relation = 'bussig.message'::regclass AND mode = 'AccessExclusiveLock' AND NOT granted",
                &[],
            )
            .unwrap()
            .get(0);
            (waits == 1).then_some(())
        },
    );
    assert_eq!(compacted(&mut c), 0, "rewritten under a deadlock");
    c.batch_execute("COMMIT").unwrap();
    waiting
        .join()
        .unwrap()
        .expect("the other transaction got the table once the call's ended");
}

/// Senders that keep the table busy with short transactions, leaving it free only for moments, let the
/// rewrite through: it waits for the lock briefly, and they queue behind it.
#[test]
fn a_bloated_table_kept_busy_by_senders_is_rewritten() {
    let (database, mut c) = bloated_database("compaction_senders", 15, 0);
    let before = message_table_file(&mut c);
    let sending = Arc::new(AtomicBool::new(true));
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let (mut sender, sending) = (database.connect(), sending.clone());
            thread::spawn(move || {
                let mut sent = 0;
                while sending.load(Ordering::Relaxed) {
                    sender
                        .batch_execute("SELECT bussig.send('live', '1')")
                        .unwrap();
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    // A few rounds: a send slowed past the wait by a loaded machine leaves the table for the next.
    let rewritten = (0..5).any(|_| compacted(&mut c) == 1);
    sending.store(false, Ordering::Relaxed);
    let sent: i64 = senders.into_iter().map(|s| s.join().unwrap()).sum();
    assert!(
        rewritten,
        "never rewritten while senders kept the table busy"
    );
    assert_ne!(message_table_file(&mut c), before);
    assert_eq!(counts(&mut c, "live").0, sent, "a send lost in the rewrite");
}

/// A DROP EXTENSION that waits for a table's lock and then fails leaves the worker running: while the
/// drop waited (three of the worker's one-second rounds) the worker only skipped its rounds. Before,
/// it left, and the launcher started the next one a minute later.
#[test]
fn a_drop_extension_that_fails_leaves_the_worker_running() {
    let db = Database::create("drop_fails");
    let session = || Client::connect(&session_url_for(&db.name), NoTls).unwrap();
    let mut admin = session();
    admin.batch_execute("CREATE EXTENSION bussig").unwrap();
    let worker = |c: &mut Client| -> Option<i32> {
        c.query_opt(
            "SELECT pid FROM pg_stat_activity
             WHERE backend_type = 'bussig worker' AND datname = current_database()",
            &[],
        )
        .unwrap()
        .map(|row| row.get(0))
    };
    let pid = eventually(DEADLINE, "the database's worker", || worker(&mut admin));
    let mut holder = session();
    holder
        .batch_execute("BEGIN; LOCK TABLE bussig.queue IN ACCESS SHARE MODE")
        .unwrap();
    let refused = session()
        .batch_execute("SET lock_timeout = '3s'; DROP EXTENSION bussig CASCADE")
        .err()
        .and_then(|error| error.code().map(|code| code.code().to_string()));
    assert_eq!(refused, Some("55P03".into()), "the drop's lock timeout");
    holder.batch_execute("COMMIT").unwrap();
    thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        worker(&mut admin),
        Some(pid),
        "the worker left while the drop waited"
    );
}
