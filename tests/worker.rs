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

/// More messages expire at once than one batch (1,000) of a round: the worker takes batch after batch
/// within the round, instead of one a round (30 s for these 30,000 at the default 1 s interval).
#[test]
fn a_flood_of_expired_messages_is_dead_lettered_within_a_few_rounds() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "worker_ttl_flood", "message_ttl => '1 second'");
    let q = queue.name.as_str();
    client
        .execute(
            "SELECT count(*) FROM (SELECT bussig.send_batch($1::text, array_fill('{\"pad\": 1}'::jsonb, ARRAY[10000]))
                                   FROM generate_series(1, 3)) s",
            &[&q],
        )
        .unwrap();
    let sent = Instant::now();
    let dlq = queue.dlq();
    eventually(
        Duration::from_secs(15),
        "the worker to dead-letter 30,000 expired messages",
        || {
            let dead: i64 = client
                .query_one(
                    "SELECT count(*) FROM bussig.message m JOIN bussig.queue d USING (queue_id)
                     WHERE d.name = $1::text",
                    &[&dlq],
                )
                .unwrap()
                .get(0);
            (dead == 30_000).then_some(())
        },
    );
    assert!(sent.elapsed() < Duration::from_secs(15));
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
