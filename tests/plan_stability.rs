//! Every verb visits rows in proportion to its batch, not to its queue or table, in the states a real
//! database ends up in: plans made on an empty table, a queue created after the last ANALYZE holding a
//! million messages, one big queue beside ten thousand small ones, a purge and refill, a compaction, a
//! queue whose every message is delayed or locked, a big dead-letter queue being redriven.
//!
//! "Visited" is what PostgreSQL's own counters say of `bussig.message` in the measuring transaction:
//! rows read by sequential scans plus index entries returned by index scans, over all its indexes. Each
//! verb runs several times first, so that the measured call runs the plan the backend keeps (the plan
//! cache tries custom plans for the first five executions).

use bussig_tests::*;

/// Messages in the big queue of each state.
const BIG: i64 = 1_000_000;
/// A verb may visit this many rows per message of its batch, plus `SLACK`: an index probe per
/// priority, a dead-letter queue's row, a redelivered row's two versions.
const PER_MESSAGE: i64 = 4;
const SLACK: i64 = 40;
const WARM_UP: usize = 6;

/// Rows of `bussig.message` visited so far in this transaction, and buffers fetched (for the message).
fn visits(c: &mut impl GenericClient) -> (i64, i64) {
    let row = c
        .query_one(
            "SELECT (pg_stat_get_xact_tuples_returned('bussig.message'::regclass)
                     + sum(pg_stat_get_xact_tuples_returned(i.indexrelid)))::bigint,
                    (pg_stat_get_xact_blocks_fetched('bussig.message'::regclass)
                     + sum(pg_stat_get_xact_blocks_fetched(i.indexrelid)))::bigint
             FROM pg_index i WHERE i.indrelid = 'bussig.message'::regclass",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// Runs `verb` `WARM_UP` times, each in a transaction of its own, then once more measured, and checks
/// the rows it visited against its batch of `batch` messages. `verb` gets the transaction and may
/// prepare (a read to have something to settle) before it calls `measure`.
fn check(
    client: &mut Client,
    state: &str,
    name: &str,
    batch: i64,
    mut verb: impl FnMut(&mut Transaction<'_>, &mut dyn FnMut(&mut Transaction<'_>, &str)),
) {
    let mut visited = None;
    for round in 0..=WARM_UP {
        let mut tx = client.transaction().unwrap();
        verb(&mut tx, &mut |tx, sql| {
            let before = visits(tx);
            tx.batch_execute(sql)
                .unwrap_or_else(|e| panic!("{state}: {name}: {sql}: {e:?}"));
            let after = visits(tx);
            if round == WARM_UP {
                visited = Some((after.0 - before.0, after.1 - before.1));
            }
        });
        tx.commit().unwrap();
    }
    let (rows, buffers) = visited.unwrap_or_else(|| panic!("{state}: {name} measured nothing"));
    let bound = PER_MESSAGE * batch + SLACK;
    assert!(
        rows <= bound,
        "{state}: {name} of {batch} visited {rows} rows ({buffers} buffers), more than {bound}"
    );
}

/// The first delivery of a read of `max` in this transaction, as `(id, token)` literals.
fn read_tokens(tx: &mut Transaction<'_>, queue: &str, max: i32) -> Vec<(i64, String)> {
    tx.query(
        "SELECT message_id, lock_token::text FROM bussig.read($1::text, $2::int)",
        &[&queue, &max],
    )
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

fn id_list(deliveries: &[(i64, String)]) -> (String, String) {
    let ids: Vec<String> = deliveries.iter().map(|(id, _)| id.to_string()).collect();
    let tokens: Vec<String> = deliveries.iter().map(|(_, t)| format!("'{t}'")).collect();
    (
        format!("ARRAY[{}]::bigint[]", ids.join(",")),
        format!("ARRAY[{}]::uuid[]", tokens.join(",")),
    )
}

/// Every verb of a queue that holds ready messages; `dead_letter` needs the queue's own DLQ.
fn check_every_verb(client: &mut Client, state: &str, queue: &str) {
    check(client, state, "send", 1, |tx, measure| {
        measure(
            tx,
            &format!("SELECT bussig.send('{queue}', '{{\"n\": 1}}')"),
        )
    });
    check(client, state, "send_batch", 10, |tx, measure| {
        measure(
            tx,
            &format!(
                "SELECT bussig.send_batch('{queue}', array_fill('{{\"n\": 1}}'::jsonb, ARRAY[10]))"
            ),
        )
    });
    check(client, state, "publish", 1, |tx, measure| {
        measure(
            tx,
            &format!("SELECT bussig.publish('plan.{queue}', '{{\"n\": 1}}')"),
        )
    });
    check(client, state, "read", 10, |tx, measure| {
        measure(
            tx,
            &format!("SELECT count(*) FROM bussig.read('{queue}', 10)"),
        )
    });
    check(client, state, "peek", 10, |tx, measure| {
        measure(
            tx,
            &format!("SELECT count(*) FROM bussig.peek('{queue}', 10)"),
        )
    });
    check(client, state, "ack", 1, |tx, measure| {
        let (id, token) = read_tokens(tx, queue, 1).remove(0);
        measure(
            tx,
            &format!("SELECT bussig.ack('{queue}', {id}, '{token}')"),
        )
    });
    check(client, state, "ack_batch", 10, |tx, measure| {
        let (ids, tokens) = id_list(&read_tokens(tx, queue, 10));
        measure(
            tx,
            &format!("SELECT bussig.ack_batch('{queue}', {ids}, {tokens})"),
        )
    });
    check(client, state, "ack_and_read", 20, |tx, measure| {
        let (ids, tokens) = id_list(&read_tokens(tx, queue, 10));
        measure(
            tx,
            &format!("SELECT count(*) FROM bussig.ack_and_read('{queue}', {ids}, {tokens}, 10)"),
        )
    });
    check(client, state, "nack", 1, |tx, measure| {
        let (id, token) = read_tokens(tx, queue, 1).remove(0);
        measure(
            tx,
            &format!("SELECT bussig.nack('{queue}', {id}, '{token}', delay => '1 hour')"),
        )
    });
    check(client, state, "extend_lock", 1, |tx, measure| {
        let (id, token) = read_tokens(tx, queue, 1).remove(0);
        measure(
            tx,
            &format!("SELECT bussig.extend_lock('{queue}', {id}, '{token}', '1 hour')"),
        )
    });
    check(client, state, "dead_letter", 1, |tx, measure| {
        let (id, token) = read_tokens(tx, queue, 1).remove(0);
        measure(
            tx,
            &format!("SELECT bussig.dead_letter('{queue}', {id}, '{token}', reason => 'plan')"),
        )
    });
    check(client, state, "redrive", 10, |tx, measure| {
        measure(
            tx,
            &format!("SELECT bussig.redrive('{queue}', max_messages => 10)"),
        )
    });
}

/// VACUUM of the message table once no other transaction of this database (the worker's, say) holds a
/// snapshot that would keep it from removing what is dead.
fn vacuum_when_alone(admin: &mut Client) {
    eventually(
        std::time::Duration::from_secs(60),
        "no snapshot in this database",
        || {
            let others: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_xmin IS NOT NULL",
                &[],
            )
            .unwrap()
            .get(0);
            (others == 0).then_some(())
        },
    );
    admin.batch_execute("VACUUM bussig.message").unwrap();
}

/// `count` messages into `queue` through send_batch, in calls of 10,000.
fn fill(client: &mut Client, queue: &str, count: i64, options: &str) {
    client
        .batch_execute(&format!(
            "SELECT bussig.send_batch('{queue}', array_fill('{{\"n\": 1}}'::jsonb, ARRAY[least(10000, {count} - i)]){options})
             FROM generate_series(0, {count} - 1, 10000) i"
        ))
        .unwrap();
}

#[test]
fn every_verb_visits_rows_in_proportion_to_its_batch() {
    let database = Database::create("plan_rows");
    let mut admin = database.connect();
    admin
        .batch_execute(
            "CREATE EXTENSION bussig;
             -- Statistics change only where the test says so.
             ALTER TABLE bussig.message SET (autovacuum_enabled = false);
             ALTER TABLE bussig.queue SET (autovacuum_enabled = false);
             ANALYZE;
             SELECT bussig.create_queue('early');
             SELECT bussig.subscribe('early', 'plan.early')",
        )
        .unwrap();

    // The table empty and analyzed: plans made now, then a backlog arrives.
    let mut early = database.connect();
    fill(&mut admin, "early", 2_000, "");
    check_every_verb(&mut early, "plans made on an empty table", "early");
    // Statistics that know only the queue there was: the next queue's id looks like one row.
    admin
        .batch_execute(
            "ANALYZE bussig.message;
             SELECT bussig.create_queue('big');
             SELECT bussig.subscribe('big', 'plan.big')",
        )
        .unwrap();
    fill(&mut admin, "big", BIG, "");
    check_every_verb(
        &mut early,
        "plans made on an empty table, then a million",
        "big",
    );

    // The same, planned now in a new backend: the statistics know nothing of this queue.
    check_every_verb(
        &mut database.connect(),
        "a queue created after the last ANALYZE",
        "big",
    );

    // One big queue beside 10,000 queues of one message each, analyzed.
    admin
        .batch_execute(
            "SELECT bussig.create_queue('small_' || i) FROM generate_series(1, 10000) i;
             SELECT bussig.send('small_' || i, '{}') FROM generate_series(1, 10000) i;
             ANALYZE bussig.message;
             ANALYZE bussig.queue",
        )
        .unwrap();
    let mut beside = database.connect();
    check_every_verb(&mut beside, "a million beside 10,000 queues of one", "big");
    check(
        &mut beside,
        "10,000 queues of one",
        "read of a small queue",
        10,
        |tx, measure| measure(tx, "SELECT count(*) FROM bussig.read('small_1', 10)"),
    );

    // Right after a purge of the million and a refill. The purge leaves a million dead index entries
    // that reads step over until VACUUM, or until they mark them dead (which no snapshot older than
    // the purge may stop): that is the cost of churn, not of a plan, so they are vacuumed here.
    admin
        .batch_execute("SELECT bussig.purge_queue('big')")
        .unwrap();
    vacuum_when_alone(&mut admin);
    fill(&mut admin, "big", 100_000, "");
    check_every_verb(
        &mut database.connect(),
        "right after purge_queue and a refill",
        "big",
    );

    // Right after the worker's compaction (its rewrite, as the worker runs it), then a backlog.
    admin
        .batch_execute(
            "SELECT bussig.purge_queue('big');
             CLUSTER bussig.message USING message_delivery_order",
        )
        .unwrap();
    let mut compacted = database.connect();
    check(
        &mut compacted,
        "right after compaction",
        "read of an empty queue",
        10,
        |tx, measure| measure(tx, "SELECT count(*) FROM bussig.read('big', 10)"),
    );
    fill(&mut admin, "big", BIG, "");
    check_every_verb(
        &mut compacted,
        "right after compaction, then a million",
        "big",
    );

    // Every message of a queue delayed or locked: a read finds nothing, and must not walk them.
    admin
        .batch_execute(
            "SELECT bussig.create_queue('held'); SELECT bussig.subscribe('held', 'plan.held')",
        )
        .unwrap();
    // Locked as a read leaves them: visible an hour from now, with a token.
    fill(&mut admin, "held", BIG, ", delay => '1 hour'");
    admin
        .batch_execute(
            "UPDATE bussig.message SET lock_token = gen_random_uuid()
             WHERE queue_id = (SELECT queue_id FROM bussig.queue WHERE name = 'held') AND message_id % 2 = 0",
        )
        .unwrap();
    let mut held = database.connect();
    for (name, sql) in [
        ("read", "SELECT count(*) FROM bussig.read('held', 10)"),
        (
            "read with a wait",
            "SELECT count(*) FROM bussig.read('held', 10, wait => '10 milliseconds')",
        ),
        ("peek", "SELECT count(*) FROM bussig.peek('held', 10)"),
        (
            "ack_and_read",
            "SELECT count(*) FROM bussig.ack_and_read('held', max_messages => 10)",
        ),
        ("send", "SELECT bussig.send('held', '{}')"),
        ("publish", "SELECT bussig.publish('plan.held', '{}')"),
    ] {
        check(
            &mut held,
            "every message delayed or locked",
            name,
            10,
            |tx, measure| measure(tx, sql),
        );
    }

    // A dead-letter queue of a million being redriven, built as dead-lettering leaves it.
    admin
        .batch_execute(&format!(
            "INSERT INTO bussig.message (queue_id, visible_at, payload, headers)
             SELECT q.queue_id, now(), '{{}}',
                    '{{\"bussig-source-queue\": \"big\", \"bussig-dead-letter-reason\": \"plan\"}}'
             FROM bussig.queue q, generate_series(1, {BIG}) WHERE q.name = 'big_dlq'"
        ))
        .unwrap();
    let mut redriving = database.connect();
    check(
        &mut redriving,
        "a dead-letter queue of a million",
        "redrive",
        10,
        |tx, measure| measure(tx, "SELECT bussig.redrive('big', max_messages => 10)"),
    );
    check(
        &mut redriving,
        "a dead-letter queue of a million",
        "read",
        10,
        |tx, measure| measure(tx, "SELECT count(*) FROM bussig.read('big_dlq', 10)"),
    );
}

#[test]
fn plans_made_on_an_empty_table_still_use_the_indexes() {
    let database = Database::create("plan_stability");
    let mut admin = database.connect();
    // No ANALYZE may come along and invalidate the plans in between.
    admin
        .batch_execute(
            "CREATE EXTENSION bussig;
             ALTER TABLE bussig.message SET (autovacuum_enabled = false);
             SELECT bussig.create_queue('q');",
        )
        .unwrap();
    send(&mut admin, "q", &json!({ "n": 0 }));
    let drained = read_one(&mut admin, "q").expect("the message sent");
    assert!(ack(&mut admin, "q", drained.id, drained.token));
    admin.batch_execute("VACUUM bussig.message").unwrap();
    let (pages, tuples): (i32, f32) = {
        let row = admin
            .query_one(
                "SELECT relpages, reltuples FROM pg_class WHERE oid = 'bussig.message'::regclass",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        pages <= 1 && tuples == 0.0,
        "the table looks empty to the planner: {pages} pages, {tuples} rows"
    );

    // A consumer plans read and ack_batch now, past the plan cache's first five custom plans.
    let mut consumer = database.connect();
    for _ in 0..6 {
        assert!(read(&mut consumer, "q", 10, None).is_empty());
        let settled: i64 = consumer
            .query_one(
                "SELECT bussig.ack_batch('q', ARRAY[1, 2]::bigint[], ARRAY[gen_random_uuid(), gen_random_uuid()])",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(settled, 0);
    }

    admin
        .batch_execute(
            "SELECT count(*) FROM bussig.send_batch('q', array_fill('{\"n\": 1}'::jsonb, ARRAY[20000]))",
        )
        .unwrap();

    let mut tx = consumer.transaction().unwrap();
    let before = visits(&mut tx).0;
    let batch = read(&mut tx, "q", 10, None);
    assert_eq!(batch.len(), 10);
    let ids: Vec<i64> = batch.iter().map(|d| d.id).collect();
    let tokens: Vec<uuid::Uuid> = batch.iter().map(|d| d.token).collect();
    let settled: i64 = tx
        .query_one("SELECT bussig.ack_batch('q', $1, $2)", &[&ids, &tokens])
        .unwrap()
        .get(0);
    assert_eq!(settled, 10);
    let visited = visits(&mut tx).0 - before;
    assert!(
        visited < 100,
        "a read and an ack of 10 visited {visited} of the 20,000 messages"
    );
    tx.commit().unwrap();
}
