//! bussig.queue_depth and the `messages` of bussig.queues come from counts that commits keep in
//! shared memory. These tests hold them against the rows themselves after every kind of change, after
//! rollbacks, and under concurrent commits. Each runs in a database of its own with the worker kept
//! out, so that nothing moves between the count and the rows it is held against.
use std::thread;

use bussig_tests::*;

/// `(queue_depth, rows)` of `queue`, in one statement.
fn depth_and_rows(c: &mut impl GenericClient, queue: &str) -> (i64, i64) {
    let row = c
        .query_one(
            "SELECT bussig.queue_depth($1::text),
                    (SELECT count(*) FROM bussig.message m JOIN bussig.queue q USING (queue_id)
                     WHERE q.name = $1::text)",
            &[&queue],
        )
        .unwrap_or_else(|e| panic!("queue_depth({queue}): {e}"));
    (row.get(0), row.get(1))
}

fn assert_exact(c: &mut Client, queues: &[&str], after: &str) {
    for queue in queues {
        let (depth, rows) = depth_and_rows(c, queue);
        assert_eq!(depth, rows, "depth of {queue} after {after}");
        let in_view: i64 = c
            .query_one(
                "SELECT messages FROM bussig.queues WHERE queue = $1::text",
                &[queue],
            )
            .unwrap()
            .get(0);
        assert_eq!(
            in_view, rows,
            "bussig.queues.messages of {queue} after {after}"
        );
    }
}

fn ids_and_tokens(deliveries: &[Delivery]) -> (Vec<i64>, Vec<uuid::Uuid>) {
    deliveries.iter().map(|d| (d.id, d.token)).unzip()
}

#[test]
fn every_change_to_a_queue_keeps_its_depth_equal_to_its_rows() {
    let (_db, mut c) = Database::without_worker("depth_verbs");
    c.batch_execute(
        "SELECT bussig.create_queue('q', max_deliveries => 2);
         SELECT bussig.create_queue('t', message_ttl => '1 second');
         SELECT bussig.subscribe('q', 'orders.*')",
    )
    .unwrap();
    let all = ["q", "q_dlq", "t", "t_dlq"];
    assert_exact(&mut c, &all, "create_queue");

    send(&mut c, "q", &serde_json::json!(1));
    send_batch(
        &mut c,
        "q",
        &[
            serde_json::json!(2),
            serde_json::json!(3),
            serde_json::json!(4),
        ],
    );
    c.execute("SELECT bussig.publish('orders.new', '5')", &[])
        .unwrap();
    c.execute("SELECT bussig.send('q', '6', delay => '1 hour')", &[])
        .unwrap();
    assert_exact(&mut c, &all, "send, send_batch, publish");

    let got = read(&mut c, "q", 4, None);
    assert_eq!(got.len(), 4);
    assert_exact(&mut c, &all, "read");
    assert!(ack(&mut c, "q", got[0].id, got[0].token));
    let (ids, tokens) = ids_and_tokens(&got[1..2]);
    c.execute("SELECT bussig.ack_batch('q', $1, $2)", &[&ids, &tokens])
        .unwrap();
    // A stale token acks nothing and takes nothing off.
    c.execute("SELECT bussig.ack_batch('q', $1, $2)", &[&ids, &tokens])
        .unwrap();
    c.execute(
        "SELECT bussig.nack('q', $1, $2, delay => '0 s')",
        &[&got[2].id, &got[2].token],
    )
    .unwrap();
    assert_exact(&mut c, &all, "ack, ack_batch, nack");

    let (ids, tokens) = ids_and_tokens(&got[3..4]);
    let next = c
        .query(
            "SELECT message_id, lock_token FROM bussig.ack_and_read('q', $1, $2, 1)",
            &[&ids, &tokens],
        )
        .unwrap();
    assert_eq!(next.len(), 1);
    let (id, token): (i64, uuid::Uuid) = (next[0].get(0), next[0].get(1));
    let extended: bool = c
        .query_one("SELECT bussig.extend_lock('q', $1, $2)", &[&id, &token])
        .unwrap()
        .get(0);
    assert!(extended);
    assert_exact(&mut c, &all, "ack_and_read, extend_lock");

    // The message nacked above is on its second and last delivery: a nack dead-letters it.
    let last: Vec<Delivery> = read(&mut c, "q", 10, None)
        .into_iter()
        .filter(|d| d.delivery_count == 2)
        .collect();
    assert_eq!(last.len(), 1);
    c.execute(
        "SELECT bussig.nack('q', $1, $2)",
        &[&last[0].id, &last[0].token],
    )
    .unwrap();
    assert_exact(&mut c, &all, "a nack past max_deliveries");

    c.execute(
        "UPDATE bussig.message SET visible_at = now() - interval '1 s'",
        &[],
    )
    .unwrap();
    // As if time had passed: the queue's read position, which nothing moved back past the messages
    // made ready by hand, lives 1 s.
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    let got = read(&mut c, "q", 1, None);
    c.execute(
        "SELECT bussig.dead_letter('q', $1, $2, 'rejected')",
        &[&got[0].id, &got[0].token],
    )
    .unwrap();
    assert_exact(&mut c, &all, "dead_letter");
    let redriven: i64 = c
        .query_one("SELECT bussig.redrive('q')", &[])
        .unwrap()
        .get(0);
    assert_eq!(redriven, 2);
    assert_exact(&mut c, &all, "redrive");

    send_batch(&mut c, "t", &[serde_json::json!(1), serde_json::json!(2)]);
    thread::sleep(std::time::Duration::from_millis(1100));
    let expired: serde_json::Value = c
        .query_one("SELECT bussig.run_maintenance()", &[])
        .unwrap()
        .get(0);
    assert_eq!(expired["expired_messages"], 2);
    assert_exact(&mut c, &all, "TTL expiry");

    let purged: i64 = c
        .query_one("SELECT bussig.purge_queue('q')", &[])
        .unwrap()
        .get(0);
    assert!(purged > 0);
    assert_exact(&mut c, &all, "purge_queue");

    c.execute("SELECT bussig.drop_queue('t')", &[]).unwrap();
    let gone = c
        .query_one("SELECT bussig.queue_depth('t')", &[])
        .unwrap_err();
    assert_eq!(gone.code().map(|c| c.code()), Some("42704"));
    assert_exact(&mut c, &["q", "q_dlq"], "drop_queue");
}

#[test]
fn a_transaction_sees_its_own_changes_and_nobody_sees_what_rolled_back() {
    let (db, mut c) = Database::without_worker("depth_rollback");
    c.batch_execute("SELECT bussig.create_queue('q')").unwrap();
    send_batch(&mut c, "q", &[serde_json::json!(1), serde_json::json!(2)]);
    let mut other = db.connect();

    let mut tx = c.transaction().unwrap();
    send(&mut tx, "q", &serde_json::json!(3));
    assert_eq!(depth_and_rows(&mut tx, "q"), (3, 3));
    assert_eq!(depth_and_rows(&mut other, "q"), (2, 2));
    tx.batch_execute("SAVEPOINT s").unwrap();
    send_batch(&mut tx, "q", &[serde_json::json!(4), serde_json::json!(5)]);
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(depth_and_rows(&mut tx, "q"), (3, 3));
    tx.batch_execute("SAVEPOINT inner_commit").unwrap();
    send(&mut tx, "q", &serde_json::json!(6));
    tx.batch_execute("RELEASE SAVEPOINT inner_commit").unwrap();
    tx.commit().unwrap();
    assert_eq!(depth_and_rows(&mut other, "q"), (4, 4));

    let mut tx = c.transaction().unwrap();
    let got = read(&mut tx, "q", 4, None);
    let (ids, tokens) = ids_and_tokens(&got);
    tx.execute("SELECT bussig.ack_batch('q', $1, $2)", &[&ids, &tokens])
        .unwrap();
    assert_eq!(depth_and_rows(&mut tx, "q"), (0, 0));
    tx.rollback().unwrap();
    assert_eq!(depth_and_rows(&mut c, "q"), (4, 4));

    // A queue created and filled in a transaction that rolls back leaves nothing behind.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SELECT bussig.create_queue('r'); SELECT bussig.send('r', '1')")
        .unwrap();
    assert_eq!(depth_and_rows(&mut tx, "r"), (1, 1));
    tx.rollback().unwrap();
    c.batch_execute("SELECT bussig.create_queue('r')").unwrap();
    assert_exact(&mut c, &["q", "r"], "rollbacks");
}

#[test]
fn a_truncated_or_rewritten_message_table_is_counted_again() {
    let (_db, mut c) = Database::without_worker("depth_truncate");
    c.batch_execute("SELECT bussig.create_queue('q')").unwrap();
    send_batch(&mut c, "q", &[serde_json::json!(1), serde_json::json!(2)]);
    assert_exact(&mut c, &["q"], "send_batch");
    c.batch_execute("TRUNCATE bussig.message").unwrap();
    assert_eq!(depth_and_rows(&mut c, "q"), (0, 0), "after TRUNCATE");
    send(&mut c, "q", &serde_json::json!(3));
    c.batch_execute("CLUSTER bussig.message USING message_delivery_order")
        .unwrap();
    send(&mut c, "q", &serde_json::json!(4));
    assert_exact(&mut c, &["q", "q_dlq"], "a rewrite and more sends");
}

#[test]
fn concurrent_commits_and_rollbacks_leave_every_depth_exact() {
    let (db, mut admin) = Database::without_worker("depth_concurrent");
    admin
        .batch_execute(
            "SELECT bussig.create_queue('a', max_deliveries => 3);
             SELECT bussig.create_queue('b', max_deliveries => 3)",
        )
        .unwrap();
    thread::scope(|s| {
        for worker in 0..6u64 {
            let db = &db;
            s.spawn(move || {
                let mut dice = Dice(0x9E37_79B9_7F4A_7C15 ^ (worker + 1));
                let mut c = db.connect();
                for _ in 0..150 {
                    let queue = if dice.below(2) == 0 { "a" } else { "b" };
                    let mut tx = c.transaction().unwrap();
                    match dice.below(4) {
                        0 => {
                            let batch: Vec<_> = (0..1 + dice.below(5))
                                .map(serde_json::Value::from)
                                .collect();
                            send_batch(&mut tx, queue, &batch);
                        }
                        1 => {
                            let got = read(&mut tx, queue, 3, Some("0.05 s"));
                            let (ids, tokens) = ids_and_tokens(&got);
                            tx.execute(
                                "SELECT bussig.ack_batch($1::text, $2, $3)",
                                &[&queue, &ids, &tokens],
                            )
                            .unwrap();
                        }
                        2 => {
                            for got in read(&mut tx, queue, 2, Some("0.05 s")) {
                                tx.execute(
                                    "SELECT bussig.nack($1::text, $2, $3, delay => '0 s')",
                                    &[&queue, &got.id, &got.token],
                                )
                                .unwrap();
                            }
                        }
                        _ => {
                            send(&mut tx, queue, &serde_json::json!("x"));
                            tx.batch_execute("SAVEPOINT s").unwrap();
                            send(&mut tx, queue, &serde_json::json!("y"));
                            tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
                        }
                    }
                    if dice.below(10) < 3 {
                        tx.rollback().unwrap();
                    } else {
                        tx.commit().unwrap();
                    }
                }
            });
        }
        s.spawn(|| {
            let mut c = db.connect();
            for _ in 0..300 {
                for queue in ["a", "b", "a_dlq", "b_dlq"] {
                    let depth: i64 = c
                        .query_one("SELECT bussig.queue_depth($1::text)", &[&queue])
                        .unwrap()
                        .get(0);
                    assert!(depth >= 0, "depth of {queue} below zero: {depth}");
                }
            }
        });
    });
    assert_exact(&mut admin, &["a", "b", "a_dlq", "b_dlq"], "concurrent work");
}

/// After a rewrite every count starts over from the rows, taken while commits go on: the count keeps
/// what commits during it add, and must not add again what its snapshot already saw. The queue is
/// large enough that each count takes a while, and more sessions commit than a count could judge by
/// arrival alone.
#[test]
fn counts_taken_from_the_rows_while_commits_go_on_are_exact() {
    let (db, mut admin) = Database::without_worker("depth_recount");
    admin
        .batch_execute(
            "SELECT bussig.create_queue('q');
             SELECT bussig.send_batch('q', array_agg(to_jsonb(i))) FROM generate_series(1, 20000) i",
        )
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|s| {
        for worker in 0..10u64 {
            let (db, stop) = (&db, &stop);
            s.spawn(move || {
                let mut c = db.connect();
                let mut dice = Dice(0x2545_F491_4F6C_DD1D ^ (worker + 1));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if dice.below(3) == 0 {
                        let mut tx = c.transaction().unwrap();
                        let got = read(&mut tx, "q", 4, None);
                        let (ids, tokens) = ids_and_tokens(&got);
                        tx.execute("SELECT bussig.ack_batch('q', $1, $2)", &[&ids, &tokens])
                            .unwrap();
                        tx.commit().unwrap();
                    } else {
                        send(&mut c, "q", &serde_json::json!(worker));
                    }
                }
            });
        }
        let mut c = db.connect();
        for _ in 0..60 {
            // A rewrite gives the table a new file, so the next look counts the rows.
            c.batch_execute("CLUSTER bussig.message USING message_delivery_order")
                .unwrap();
            let depth: i64 = c
                .query_one("SELECT bussig.queue_depth('q')", &[])
                .unwrap()
                .get(0);
            assert!(depth >= 0, "depth below zero: {depth}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_exact(&mut admin, &["q"], "counts taken during commits");
}

#[test]
fn queue_depth_is_for_roles_that_may_use_the_queue() {
    let q = {
        let mut admin = connect();
        Queue::create(&mut admin, "depth_privilege", "")
    };
    let role = Role::create("depth_privilege");
    let mut admin = connect();
    send(&mut admin, &q.name, &serde_json::json!(1));
    let as_role = |admin: &mut Client| -> Result<i64, postgres::Error> {
        let mut tx = admin.transaction().unwrap();
        tx.batch_execute(&format!("SET LOCAL ROLE \"{}\"", role.name))
            .unwrap();
        let depth = tx.query_one("SELECT bussig.queue_depth($1::text)", &[&q.name]);
        tx.rollback().unwrap();
        depth.map(|row| row.get(0))
    };
    let denied = as_role(&mut admin).unwrap_err();
    assert_eq!(denied.code().map(|c| c.code()), Some("42501"));
    admin
        .execute(
            "SELECT bussig.grant($1::text, $2::text, ARRAY['consume'])",
            &[&q.name, &role.name],
        )
        .unwrap();
    assert_eq!(as_role(&mut admin).unwrap(), 1);
    admin
        .execute(
            "SELECT bussig.revoke($1::text, $2::text)",
            &[&q.name, &role.name],
        )
        .unwrap();
}

/// A send prepared (two-phase) to a queue the counts have not looked at since the table's file
/// changed, counted before its COMMIT PREPARED: that commit runs in another session and adds nothing,
/// so the count must not stay as exact. The PREPARE marks the queue to be counted again, by the
/// worker's next statistics round or a `run_maintenance()`. It marked only queues counted already,
/// and that recount never counted anything (it ran after the statistics step had taken a
/// transaction id): the count stayed short for good.
#[test]
fn a_prepared_send_to_a_queue_not_counted_yet_is_counted_after_its_commit() {
    let (db, mut c) = Database::without_worker("depth_prepared_unseen");
    c.batch_execute("SELECT bussig.create_queue('q')").unwrap();
    send(&mut c, "q", &serde_json::json!(1));
    // A new file: no queue of it is counted yet.
    c.batch_execute("CLUSTER bussig.message USING message_delivery_order")
        .unwrap();
    let gid = format!("bussig_depth_{}", std::process::id());
    let mut preparer = db.connect();
    preparer
        .batch_execute(&format!(
            "BEGIN; SELECT bussig.send('q', '2'); SELECT bussig.send('q', '3');
             PREPARE TRANSACTION '{gid}'"
        ))
        .unwrap();
    assert_eq!(depth_and_rows(&mut c, "q"), (1, 1), "before the commit");
    c.batch_execute(&format!("COMMIT PREPARED '{gid}'"))
        .unwrap();
    let recounted: i64 = c
        .query_one(
            "SELECT (bussig.run_maintenance() ->> 'recounted_depths')::bigint",
            &[],
        )
        .unwrap()
        .get(0);
    // q, and q_dlq, which no look had counted in the new file either.
    assert_eq!(recounted, 2);
    assert_exact(&mut c, &["q"], "COMMIT PREPARED and a maintenance round");
}
