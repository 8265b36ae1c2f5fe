//! The worker's compaction (`src/worker/compaction.rs`): a bloated message table is rewritten with
//! its live rows, when and how its senders, readers and other transactions' snapshots allow. Each
//! test but the first runs one maintenance round in a database of its own, its worker kept out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bussig_tests::*;

const DEADLINE: Duration = Duration::from_secs(20);

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
/// more than 40,000 of them is left to VACUUM, however bloated (see src/worker/compaction.rs).
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

/// A transaction that holds a transaction id, idle in REPEATABLE READ: every row version dead since it
/// began stays, for VACUUM and for CLUSTER alike. With when it began.
fn old_snapshot(database: &Database) -> (Client, Instant) {
    let mut holder = database.connect();
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT txid_current()")
        .unwrap();
    (holder, Instant::now())
}

/// With a snapshot held (for minutes, by a forgotten session or a long report), CLUSTER would copy
/// every dead message too; the table is emptied and refilled with its live messages instead, as PgQ
/// empties rotated tables with TRUNCATE. Every message keeps its place, lock and token, and groups
/// keep their order; the transaction that held the snapshot goes on, and sees the messages as they
/// are now (they went back frozen, as COPY FREEZE writes rows).
#[test]
fn a_bloated_table_is_rewritten_under_a_held_snapshot() {
    let (database, mut c) = bloated_database("compaction_held", 0, 0);
    let (mut holder, held_since) = old_snapshot(&database);
    // Messages sent and purged under the held snapshot: their rows stay for it.
    c.batch_execute(
        "SELECT count(*) FROM (SELECT bussig.send_batch('gone', array_fill('{\"pad\": 1}'::jsonb, ARRAY[10000]))
                               FROM generate_series(1, 15)) s;
         SELECT bussig.purge_queue('gone');",
    )
    .unwrap();
    c.batch_execute(
        "SELECT bussig.create_queue('grouped');
         SELECT bussig.send('grouped', '{\"n\": 1}', group_id => 'g');
         SELECT bussig.send('grouped', '{\"n\": 2}', group_id => 'g');
         SELECT count(*) FROM (SELECT bussig.send('live', jsonb_build_object('n', i), delay => '1 hour')
                               FROM generate_series(1, 5) i) s;
         SELECT count(*) FROM (SELECT bussig.send('live', jsonb_build_object('n', i))
                               FROM generate_series(1, 5) i) s;",
    )
    .unwrap();
    let locked: Vec<(i64, uuid::Uuid)> = c
        .query(
            "SELECT message_id, lock_token FROM bussig.read('live', 2, lock_timeout => '5 minutes')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(locked.len(), 2);
    let mut before: Vec<(i64, String, i32)> = message_rows(&mut c);
    let bloated = message_table_size(&mut c);
    assert!(bloated > 8 << 20, "only {bloated} bytes written");
    // Older than the 10 s the compaction allows CLUSTER.
    thread::sleep(Duration::from_millis(10_500).saturating_sub(held_since.elapsed()));

    // The caller's own snapshot (REPEATABLE READ) predates a message committed since: the rewrite
    // reads in a snapshot of its own, taken under the lock, and keeps it.
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT txid_current()")
        .unwrap();
    let late: i64 = database
        .connect()
        .query_one("SELECT bussig.send('live', '{\"late\": true}')", &[])
        .unwrap()
        .get(0);
    before.push((late, "live".into(), 0));
    assert_eq!(compacted(&mut c), 1, "not rewritten under a held snapshot");
    c.batch_execute("COMMIT").unwrap();
    assert!(
        message_table_size(&mut c) < bloated / 20,
        "{} bytes left of {bloated}",
        message_table_size(&mut c)
    );
    assert_eq!(
        message_rows(&mut c),
        before,
        "messages changed by the rewrite"
    );
    // The rows went back frozen: the old snapshot sees every message as it is now.
    let seen: i64 = holder
        .query_one("SELECT count(*) FROM bussig.message", &[])
        .unwrap()
        .get(0);
    assert_eq!(seen, before.len() as i64, "the old snapshot's view");
    assert_eq!(counts(&mut c, "live"), (4, 5, 2));
    for (id, token) in &locked {
        let acked: bool = c
            .query_one("SELECT bussig.ack('live', $1, $2)", &[id, token])
            .unwrap()
            .get(0);
        assert!(acked, "message {id}'s lock was lost");
    }
    // The group kept its order: the second message waits for the first.
    let first: Vec<(i64, uuid::Uuid)> = c
        .query(
            "SELECT message_id, lock_token FROM bussig.read('grouped', 10)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        first.len(),
        1,
        "a group gave out {} messages at once",
        first.len()
    );
    c.query_one(
        "SELECT bussig.ack('grouped', $1, $2)",
        &[&first[0].0, &first[0].1],
    )
    .unwrap();
    let payloads: Vec<serde_json::Value> = c
        .query("SELECT payload FROM bussig.read('grouped', 10)", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(payloads, vec![serde_json::json!({"n": 2})]);
    holder.batch_execute("COMMIT").unwrap();
}

/// Every message as (id, queue, delivery count), in id order.
fn message_rows(c: &mut Client) -> Vec<(i64, String, i32)> {
    c.query(
        "SELECT m.message_id, q.name, m.delivery_count
         FROM bussig.message m JOIN bussig.queue q USING (queue_id) ORDER BY m.message_id",
        &[],
    )
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1), row.get(2)))
    .collect()
}
