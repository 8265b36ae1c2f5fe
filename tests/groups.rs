//! Ordered message groups under concurrency: producers send to their own groups (single sends and
//! batches), eight consumers read, ack, nack at random, let locks run out and vanish mid-batch. A
//! watcher checks the whole time that no group ever has two messages locked at once, and a ledger
//! written in each ack's own transaction shows every group acked in send order, each message once.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bussig_tests::*;
use serde_json::Value;

const GROUPS: i64 = 24;
const PER_GROUP: i64 = 25;
const PRODUCERS: i64 = 3;
const CONSUMERS: u64 = 8;
const LOCK: &str = "300 milliseconds";

/// Sends `payload` to `queue` in group `group`.
fn send_grouped(c: &mut impl GenericClient, queue: &str, payload: &Value, group: &str) {
    c.execute(
        "SELECT bussig.send($1::text, $2::jsonb, group_id => $3::text)",
        &[&queue, payload, &group],
    )
    .unwrap();
}

#[test]
fn groups_stay_ordered_and_single_file_under_concurrent_consumers() {
    let mut admin = connect();
    let created = Queue::create(&mut admin, "groups", "max_deliveries => 1000");
    let queue = created.name.clone();
    let ledger = format!("{queue}_ledger");
    admin
        .batch_execute(&format!(
            "CREATE TABLE {ledger} (n bigserial, group_id text, seq bigint)"
        ))
        .unwrap();
    let done = AtomicBool::new(false);
    let violations = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(90);

    thread::scope(|scope| {
        // The watcher: two locked messages of one group would break the contract.
        scope.spawn(|| {
            let mut c = connect();
            while !done.load(Ordering::Relaxed) {
                let doubled: i64 = c
                    .query_one(
                        "SELECT count(*) FROM (
                             SELECT m.group_id FROM bussig.message m JOIN bussig.queue q USING (queue_id)
                             WHERE q.name = $1::text AND m.group_id IS NOT NULL AND m.lock_token IS NOT NULL
                               AND m.visible_at > clock_timestamp()
                             GROUP BY m.group_id HAVING count(*) > 1) d",
                        &[&queue],
                    )
                    .unwrap()
                    .get(0);
                violations.fetch_add(doubled as u64, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(5));
            }
        });
        // Producers: each owns the groups g with g % PRODUCERS == p, so its order is the send order.
        for p in 0..PRODUCERS {
            let queue = &queue;
            scope.spawn(move || {
                let mut c = connect();
                let mut dice = Dice(0x5EED + p as u64);
                let mut next: HashMap<i64, i64> = HashMap::new();
                let mine: Vec<i64> = (0..GROUPS).filter(|g| g % PRODUCERS == p).collect();
                loop {
                    let open: Vec<i64> = mine
                        .iter()
                        .copied()
                        .filter(|g| next.get(g).copied().unwrap_or(0) < PER_GROUP)
                        .collect();
                    if open.is_empty() {
                        break;
                    }
                    let size = 1 + dice.below(4) as usize;
                    let mut payloads = Vec::new();
                    let mut groups = Vec::new();
                    for _ in 0..size {
                        let g = open[dice.below(open.len() as u64) as usize];
                        let seq = next.entry(g).or_insert(0);
                        if *seq >= PER_GROUP {
                            continue;
                        }
                        payloads.push(json!({ "g": g, "seq": *seq }));
                        groups.push(format!("g{g}"));
                        *seq += 1;
                    }
                    c.execute(
                        "SELECT count(*) FROM bussig.send_batch($1::text, $2::jsonb[], group_ids => $3::text[])",
                        &[queue, &payloads, &groups],
                    )
                    .unwrap();
                }
            });
        }
        // Consumers.
        for k in 0..CONSUMERS {
            let (queue, ledger, done) = (&queue, &ledger, &done);
            scope.spawn(move || {
                let mut dice = Dice(0xC0FFEE + k);
                let mut c = connect();
                while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let mut tx = c.transaction().unwrap();
                    let got = read(&mut tx, queue, 1 + dice.below(5) as i32, Some(LOCK));
                    tx.commit().unwrap();
                    if got.is_empty() {
                        thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    match dice.below(20) {
                        // Vanish mid-batch: the locks run out and the messages come back.
                        0 => {
                            c = connect();
                            continue;
                        }
                        // Too slow: the locks run out before the acks, which then find stale tokens.
                        1 => thread::sleep(Duration::from_millis(400)),
                        _ => {}
                    }
                    for d in got {
                        if dice.below(6) == 0 {
                            c.execute(
                                "SELECT bussig.nack($1::text, $2::bigint, $3::uuid, '0 seconds')",
                                &[queue, &d.id, &d.token],
                            )
                            .unwrap();
                            continue;
                        }
                        let mut tx = c.transaction().unwrap();
                        if ack(&mut tx, queue, d.id, d.token) {
                            tx.execute(
                                &format!(
                                    "INSERT INTO {ledger} (group_id, seq) VALUES ($1::text, $2::bigint)"
                                ),
                                &[
                                    &format!("g{}", d.payload["g"]),
                                    &d.payload["seq"].as_i64().unwrap(),
                                ],
                            )
                            .unwrap();
                        }
                        tx.commit().unwrap();
                    }
                }
            });
        }
        // The end: every message acked.
        let mut c = connect();
        let total = GROUPS * PER_GROUP;
        let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(
                Duration::from_secs(90),
                "every grouped message acked",
                || {
                    let acked: i64 = c
                        .query_one(&format!("SELECT count(*) FROM {ledger}"), &[])
                        .unwrap()
                        .get(0);
                    (acked >= total).then_some(())
                },
            )
        }));
        // The watcher and the consumers stop either way, so that a failure ends the test.
        done.store(true, Ordering::Relaxed);
        if let Err(panic) = finished {
            std::panic::resume_unwind(panic);
        }
    });

    assert_eq!(
        violations.load(Ordering::Relaxed),
        0,
        "two messages of a group were locked at once"
    );
    let out_of_order: Vec<String> = admin
        .query(
            &format!(
                "SELECT group_id || ': ' || string_agg(seq::text, ',' ORDER BY n) FROM {ledger}
                 GROUP BY group_id
                 HAVING array_agg(seq ORDER BY n) <> ARRAY(SELECT generate_series(0, {PER_GROUP} - 1)::bigint)"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        out_of_order.is_empty(),
        "groups not acked once each in send order: {out_of_order:?}"
    );
    let groups: i64 = admin
        .query_one(
            &format!("SELECT count(DISTINCT group_id) FROM {ledger}"),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(groups, GROUPS);
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM bussig.message_group g JOIN bussig.queue q USING (queue_id) WHERE q.name = $1::text",
            &[&queue],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "emptied groups are forgotten");
    admin
        .batch_execute(&format!("DROP TABLE {ledger}"))
        .unwrap();
}

/// A purge while a grouped send is in flight: the purge waits for it and takes its message too, so
/// nothing is left waiting in a group the purge forgot.
#[test]
fn a_purge_racing_a_grouped_send_leaves_no_message_behind() {
    let mut admin = connect();
    let queue = Queue::create(&mut admin, "groups_purge", "");
    let name = queue.name.clone();
    send_grouped(&mut admin, &name, &json!(1), "g");
    let mut sender = connect();
    let mut sending = sender.transaction().unwrap();
    send_grouped(&mut sending, &name, &json!(2), "g");
    let purge_name = name.clone();
    let purge = thread::spawn(move || {
        let mut c = connect();
        let purged: i64 = c
            .query_one("SELECT bussig.purge_queue($1::text)", &[&purge_name])
            .unwrap()
            .get(0);
        purged
    });
    thread::sleep(Duration::from_millis(300));
    sending.commit().unwrap();
    assert_eq!(
        purge.join().unwrap(),
        2,
        "the purge waited for the send and took both"
    );
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM bussig.message_group g JOIN bussig.queue q USING (queue_id) WHERE q.name = $1::text",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    send_grouped(&mut admin, &name, &json!(3), "g");
    let got = read(&mut admin, &name, 10, None);
    assert_eq!(got.len(), 1, "a new send heads the group again");
    assert_eq!(got[0].payload, json!(3));
}

/// A grouped send left open holds its group's row: the worker's steps pass that group's messages
/// over for the round instead of waiting (and holding every other queue up with them).
#[test]
fn the_worker_passes_over_a_group_an_open_send_holds() {
    let mut admin = connect();
    let held_queue = Queue::create(&mut admin, "groups_held", "max_deliveries => 1");
    let other_queue = Queue::create(&mut admin, "groups_other", "max_deliveries => 1");
    let (held, other) = (held_queue.name.clone(), other_queue.name.clone());
    for queue in [&held, &other] {
        send_grouped(&mut admin, queue, &json!(1), "g");
    }
    // The group's row is held before its head's lock runs out, so that no worker round comes between.
    let mut sender = connect();
    let mut sending = sender.transaction().unwrap();
    send_grouped(&mut sending, &held, &json!(2), "g");
    for queue in [&held, &other] {
        // Out on its last delivery, with a lock that runs out at once.
        assert_eq!(read(&mut admin, queue, 1, Some("1 millisecond")).len(), 1);
    }
    thread::sleep(Duration::from_millis(20));
    admin.batch_execute("SET lock_timeout = '5s'").unwrap();
    let dead_lettered = |c: &mut Client, queue: &str| -> i64 {
        c.query_one("SELECT bussig.queue_depth($1::text || '_dlq')", &[&queue])
            .unwrap()
            .get(0)
    };
    let started = std::time::Instant::now();
    admin
        .batch_execute("SELECT bussig.run_maintenance()")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the step waited on the held group"
    );
    assert_eq!(
        dead_lettered(&mut admin, &other),
        1,
        "another queue's lock ran out and was handled"
    );
    assert_eq!(
        dead_lettered(&mut admin, &held),
        0,
        "the held group waits for the next round"
    );
    sending.commit().unwrap();
    admin
        .batch_execute("SELECT bussig.run_maintenance()")
        .unwrap();
    assert_eq!(dead_lettered(&mut admin, &held), 1);
    let next = read(&mut admin, &held, 10, None);
    assert_eq!(next.len(), 1, "the group moved on to the send that held it");
}

/// An ack that moves a group on makes a message ready: a queue that asked for NOTIFY hears of it,
/// as it hears of a send. A send parked behind its group's head is not ready, and is not announced.
#[test]
fn a_group_moving_on_notifies_its_queue() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "groups_notify", "notify => true");
    let name = queue.name.clone();
    let channel = format!("bussig_{name}");
    let mut listener = connect_session();
    listener
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .unwrap();
    for n in 1..=2 {
        send_grouped(&mut client, &name, &json!(n), "g");
    }
    let got = collect_notifications(&mut listener, &channel, 1, Duration::from_millis(300));
    assert_eq!(
        got.len(),
        1,
        "the head's send notified; the one parked behind it did not: {got:?}"
    );
    let head = read(&mut client, &name, 10, None);
    assert_eq!(head.len(), 1);
    assert!(ack(&mut client, &name, head[0].id, head[0].token));
    let got = collect_notifications(&mut listener, &channel, 1, Duration::from_millis(300));
    assert_eq!(
        got.len(),
        1,
        "the ack that readied the next message notified once: {got:?}"
    );
    assert_eq!(read(&mut client, &name, 10, None)[0].payload, json!(2));
}

/// A batch whose messages are partly in a group and partly in none wakes a waiting reader for the
/// ungrouped ones: only the grouped ones wait for their group's head.
#[test]
fn the_ungrouped_messages_of_a_grouped_batch_wake_a_waiting_reader() {
    let mut admin = connect();
    let created = Queue::create(&mut admin, "mixed_batch", "");
    let queue = created.name.clone();
    send_grouped(&mut admin, &queue, &json!("head"), "a");
    let head = read_one(&mut admin, &queue).expect("the group's head");
    assert_eq!(head.payload, json!("head"));
    let waiting = {
        let (mut reader, queue) = (connect(), queue.clone());
        thread::spawn(move || {
            let began = Instant::now();
            let got: Vec<Value> = reader
                .query(
                    "SELECT payload FROM bussig.read($1::text, 1, wait => '20 seconds')",
                    &[&queue],
                )
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect();
            (got, began.elapsed())
        })
    };
    eventually(Duration::from_secs(10), "the reader waiting", || {
        let asleep: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Extension' AND query LIKE '%wait => ''20 seconds''%'",
                &[],
            )
            .unwrap()
            .get(0);
        (asleep == 1).then_some(())
    });
    admin
        .execute(
            "SELECT count(*) FROM bussig.send_batch($1::text, ARRAY['1', '2']::jsonb[],
                                                   group_ids => ARRAY['a', NULL])",
            &[&queue],
        )
        .unwrap();
    let (got, waited) = waiting.join().unwrap();
    assert_eq!(got, [json!(2)], "the ungrouped message");
    assert!(
        waited < Duration::from_secs(15),
        "the reader slept to the end of its wait"
    );
}

/// `bussig.{verb}(queue)` (purge_queue or drop_queue) on a session of its own, once it waits for a
/// row lock another transaction holds.
fn removing_while_blocked(
    watcher: &mut Client,
    verb: &'static str,
    queue: &str,
) -> thread::JoinHandle<Result<(), postgres::Error>> {
    let (mut remover, pid) = watched_session();
    let queue = queue.to_string();
    let removing = thread::spawn(move || {
        remover
            .query_one(&format!("SELECT bussig.{verb}($1::text)"), &[&queue])
            .map(|_| ())
    });
    blocked_on_a_lock(watcher, pid, verb);
    removing
}

/// The messages of a queue, by its id: a dropped queue's name finds nothing.
fn messages_of(c: &mut Client, queue_id: i32) -> i64 {
    c.query_one(
        "SELECT count(*) FROM bussig.message WHERE queue_id = $1",
        &[&queue_id],
    )
    .unwrap()
    .get(0)
}

/// A purge or drop of a queue whose group's parked follower outranks its head, while an ack of the
/// head moves the follower up: the ack takes the head, then the follower. A single DELETE in delivery
/// order took the follower first and then waited for the head, each waiting for the other (40P01);
/// the heads go first now, in a statement of their own.
#[test]
fn a_purge_or_drop_beside_an_ack_that_moves_a_group_on_does_not_deadlock() {
    for verb in ["purge_queue", "drop_queue"] {
        let mut admin = connect();
        let queue = Queue::create(&mut admin, &format!("groups_deadlock_{verb}"), "");
        let name = queue.name.clone();
        let queue_id = queue.id(&mut admin);
        admin
            .execute(
                "SELECT bussig.send($1::text, '1', group_id => 'g')",
                &[&name],
            )
            .unwrap();
        admin
            .execute(
                "SELECT bussig.send($1::text, '2', group_id => 'g', priority => 9)",
                &[&name],
            )
            .unwrap();
        let head = read(&mut admin, &name, 1, None).remove(0);
        // Another transaction holds the follower's row, so that the removal waits there first.
        let mut holder = connect();
        holder.batch_execute("BEGIN").unwrap();
        let held = holder
            .execute(
                "SELECT FROM bussig.message m JOIN bussig.queue q USING (queue_id)
                 WHERE q.name = $1::text AND m.visible_at = 'infinity' FOR UPDATE OF m",
                &[&name],
            )
            .unwrap();
        assert_eq!(held, 1, "the follower is not parked");
        let remover = removing_while_blocked(&mut admin, verb, &name);
        let (mut acker, acker_pid) = watched_session();
        let acker = thread::spawn(move || {
            acker
                .query_one(
                    "SELECT bussig.ack($1::text, $2, $3)",
                    &[&name, &head.id, &head.token],
                )
                .map(|row| row.get::<_, bool>(0))
        });
        blocked_on_a_lock(&mut admin, acker_pid, "the ack");
        holder.batch_execute("COMMIT").unwrap();
        remover
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{verb}: {e:?}"));
        acker
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("the ack beside {verb}: {e:?}"));
        assert_eq!(messages_of(&mut admin, queue_id), 0, "{verb} left messages");
    }
}

/// A purge or drop of a queue with groups locks its messages in group order and then deletes them.
/// A message that another transaction changed (a read, an ack moving a follower up) while the purge
/// waited for it must go too: deleted by the place it was locked at, it was invisible to the delete's
/// snapshot and stayed behind.
#[test]
fn a_purge_or_drop_deletes_a_message_changed_while_it_waited() {
    for verb in ["purge_queue", "drop_queue"] {
        let mut admin = connect();
        let queue = Queue::create(&mut admin, &format!("groups_changed_{verb}"), "");
        let name = queue.name.clone();
        let queue_id = queue.id(&mut admin);
        for group in ["a", "b"] {
            admin
                .execute(
                    "SELECT bussig.send($1::text, '1', group_id => $2::text)",
                    &[&name, &group],
                )
                .unwrap();
        }
        let mut changer = connect();
        changer.batch_execute("BEGIN").unwrap();
        let changed = changer
            .execute(
                "UPDATE bussig.message m SET headers = '{\"changed\": \"yes\"}'
                 FROM bussig.queue q
                 WHERE q.queue_id = m.queue_id AND q.name = $1::text AND m.group_id = 'b'",
                &[&name],
            )
            .unwrap();
        assert_eq!(changed, 1);
        let remover = removing_while_blocked(&mut admin, verb, &name);
        changer.batch_execute("COMMIT").unwrap();
        remover
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{verb}: {e:?}"));
        assert_eq!(
            messages_of(&mut admin, queue_id),
            0,
            "{verb} left the changed message"
        );
    }
}
