//! Every verb visits rows in proportion to its batch, not to its queue or table, in the states a real
//! database ends up in: plans made on an empty table, a queue created after the last ANALYZE holding a
//! million messages, one big queue beside ten thousand small ones, a purge and refill, a compaction, a
//! queue whose every message is delayed or locked, a big dead-letter queue being redriven.
//!
//! What PostgreSQL's own counters say of `bussig.message` and its indexes in the measuring transaction
//! is held to two bounds:
//! - rows: live rows read, by sequential scans or fetched through an index. A plan that goes by the
//!   queue and filters the rest reads every live row of the queue. Dead versions (the test's own
//!   earlier calls leave some at the front of a queue, which reads step over until VACUUM) are not
//!   counted: they are churn, not a plan.
//! - buffers: pages read. A plan that walks a queue's index range checking a condition inside the
//!   index returns no rows for it, but reads thousands of pages in a queue of a million.
//!
//! Each verb runs several times first, so that the measured call runs the plan the backend keeps (the
//! plan cache tries custom plans for the first five executions).

use bussig_tests::*;

/// Messages in the big queue of each state.
const BIG: i64 = 1_000_000;
/// A verb may read this many live rows per message of its batch, plus `SLACK`: an index probe per
/// priority, a dead-letter queue's row, a redelivered row's two versions.
const PER_MESSAGE: i64 = 4;
const SLACK: i64 = 40;
/// Pages a verb may read: its own work is tens to a couple of hundred (an ack_and_read of 20, with its
/// index insertions and the dead versions ahead of it, read up to 191), a walk of a queue of a million
/// many thousands (17,331 for the ack_batch whose plan flipped).
const BUFFERS: i64 = 2_000;
const WARM_UP: usize = 6;

/// A verb's measured statement, given the deliveries read first as `(ids, tokens)` array literals.
type VerbSql<'a> = Box<dyn Fn(&str, &str) -> String + 'a>;

/// What a verb settles: it reads that many deliveries of its queue first, in the same transaction.
struct Verb<'a> {
    name: &'a str,
    /// Messages the measured call handles, for the bound.
    batch: i64,
    reads_first: i32,
    /// Run before the read, unmeasured: what the verb needs at the head of the queue.
    before: Option<String>,
    /// The measured statement, given the deliveries read first as `(ids, tokens)` array literals.
    sql: VerbSql<'a>,
}

impl<'a> Verb<'a> {
    fn new(
        name: &'a str,
        batch: i64,
        reads_first: i32,
        sql: impl Fn(&str, &str) -> String + 'a,
    ) -> Self {
        Verb {
            name,
            batch,
            reads_first,
            before: None,
            sql: Box::new(sql),
        }
    }

    /// The same verb, with `sql` run first, unmeasured.
    fn after(mut self, sql: String) -> Self {
        self.before = Some(sql);
        self
    }

    /// A verb that reads nothing first.
    fn plain(name: &'a str, batch: i64, sql: impl Fn(&str, &str) -> String + 'a) -> Self {
        Self::new(name, batch, 0, sql)
    }

    /// A verb that settles the one delivery it reads first.
    fn settling(name: &'a str, sql: impl Fn(&str, &str) -> String + 'a) -> Self {
        Self::new(name, 1, 1, sql)
    }
}

/// Runs `verb` on `queue` `WARM_UP` times, each in a transaction of its own, then once more measured,
/// and checks the rows it visited against its batch.
fn check(client: &mut Client, state: &str, queue: &str, verb: &Verb<'_>) {
    let mut visited = (0, 0);
    for _ in 0..=WARM_UP {
        let mut tx = client.transaction().unwrap();
        if let Some(before) = &verb.before {
            tx.batch_execute(before)
                .unwrap_or_else(|e| panic!("{state}: before {}: {before}: {e:?}", verb.name));
        }
        let (ids, tokens) = if verb.reads_first > 0 {
            id_list(&read_tokens(&mut tx, queue, verb.reads_first))
        } else {
            Default::default()
        };
        let sql = (verb.sql)(&ids, &tokens);
        let before = message_visits(&mut tx);
        tx.batch_execute(&sql)
            .unwrap_or_else(|e| panic!("{state}: {}: {sql}: {e:?}", verb.name));
        let after = message_visits(&mut tx);
        visited = (after.0 - before.0, after.1 - before.1);
        tx.commit().unwrap();
    }
    let (rows, buffers) = visited;
    let (name, batch) = (verb.name, verb.batch);
    let bound = PER_MESSAGE * batch + SLACK;
    assert!(
        rows <= bound && buffers <= BUFFERS,
        "{state}: {name} of {batch} read {rows} live rows (at most {bound}) and {buffers} pages (at most {BUFFERS})"
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
    let q = queue;
    let verbs = [
        Verb::plain("send", 1, |_, _| {
            format!("SELECT bussig.send('{q}', '{{}}')")
        }),
        Verb::plain("send_batch", 10, |_, _| {
            format!("SELECT bussig.send_batch('{q}', array_fill('{{}}'::jsonb, ARRAY[10]))")
        }),
        Verb::plain("publish", 1, |_, _| {
            format!("SELECT bussig.publish('plan.{q}', '{{}}')")
        }),
        Verb::plain("read", 10, |_, _| {
            format!("SELECT count(*) FROM bussig.read('{q}', 10)")
        }),
        Verb::plain("peek", 10, |_, _| {
            format!("SELECT count(*) FROM bussig.peek('{q}', 10)")
        }),
        Verb::plain("redrive", 10, |_, _| {
            format!("SELECT bussig.redrive('{q}', max_messages => 10)")
        }),
        Verb::settling("ack", |ids, tokens| {
            format!("SELECT bussig.ack('{q}', ({ids})[1], ({tokens})[1])")
        }),
        Verb::settling("nack", |ids, tokens| {
            format!("SELECT bussig.nack('{q}', ({ids})[1], ({tokens})[1], delay => '1 hour')")
        }),
        Verb::settling("extend_lock", |ids, tokens| {
            format!("SELECT bussig.extend_lock('{q}', ({ids})[1], ({tokens})[1], '1 hour')")
        }),
        Verb::settling("dead_letter", |ids, tokens| {
            format!("SELECT bussig.dead_letter('{q}', ({ids})[1], ({tokens})[1], reason => 'plan')")
        }),
        // A request at the head of the queue (its priority puts it first), answered to the queue itself.
        Verb::settling("reply", |ids, tokens| {
            format!("SELECT bussig.reply('{q}', ({ids})[1], ({tokens})[1], '{{}}')")
        })
        .after(format!(
            "SELECT bussig.send('{q}', '{{}}', priority => 10, reply_to => '{q}')"
        )),
        Verb::new("ack_batch", 10, 10, |ids, tokens| {
            format!("SELECT bussig.ack_batch('{q}', {ids}, {tokens})")
        }),
        Verb::new("ack_and_read", 20, 10, |ids, tokens| {
            format!("SELECT count(*) FROM bussig.ack_and_read('{q}', {ids}, {tokens}, 10)")
        }),
    ];
    for verb in &verbs {
        check(client, state, queue, verb);
    }
}

/// Runs `maintenance` (VACUUM, CLUSTER) once no other transaction of this database holds a snapshot
/// that would keep it from removing what is dead.
fn when_alone(admin: &mut Client, maintenance: &str) {
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
    admin.batch_execute(maintenance).unwrap();
}

/// Rewrites the message table (as the worker's compaction does) once no other transaction holds a
/// snapshot, and again while the rewrite still had to keep rows that one taken in between could see
/// (an autovacuum of a catalog table of this database, say). CLUSTER counts only the live rows in
/// `reltuples` but writes the recently dead ones too, so its pages against the live rows' bytes tell.
fn cluster_alone(admin: &mut Client) {
    for _ in 0..10 {
        when_alone(admin, "CLUSTER bussig.message USING message_delivery_order");
        let only_live: bool = admin
            .query_one(
                "SELECT relpages <= 4 + 2 * (SELECT coalesce(sum(pg_column_size(m.*)), 0)
                                             FROM bussig.message m) / current_setting('block_size')::int
                 FROM pg_class WHERE oid = 'bussig.message'::regclass",
                &[],
            )
            .unwrap()
            .get(0);
        if only_live {
            return;
        }
    }
    panic!("CLUSTER kept dead rows ten times over: a snapshot of this database kept coming back");
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
    let (database, mut admin) = Database::without_worker("plan_rows");
    admin
        .batch_execute(
            "-- Statistics change only where the test says so.
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
    let read_small = Verb::plain("read", 10, |_, _| {
        "SELECT count(*) FROM bussig.read('small_1', 10)".into()
    });
    check(&mut beside, "10,000 queues of one", "small_1", &read_small);

    // Right after a purge of the million and a refill. The purge leaves a million dead index entries
    // that reads step over until VACUUM, or until they mark them dead (which no snapshot older than
    // the purge may stop): that is the cost of churn, not of a plan, so they are vacuumed here.
    admin
        .batch_execute("SELECT bussig.purge_queue('big')")
        .unwrap();
    when_alone(&mut admin, "VACUUM bussig.message");
    fill(&mut admin, "big", 100_000, "");
    check_every_verb(
        &mut database.connect(),
        "right after purge_queue and a refill",
        "big",
    );

    // Right after the worker's compaction (its rewrite, as the worker runs it), then a backlog.
    admin
        .batch_execute("SELECT bussig.purge_queue('big')")
        .unwrap();
    cluster_alone(&mut admin);
    let mut compacted = database.connect();
    let read_empty = Verb::plain("read of an empty queue", 10, |_, _| {
        "SELECT count(*) FROM bussig.read('big', 10)".into()
    });
    check(&mut compacted, "right after compaction", "big", &read_empty);
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
    // Locked as a read leaves them: visible an hour from now, with a token. At a high priority, so
    // that the reads below of ready messages at a lower one must not walk them either.
    fill(
        &mut admin,
        "held",
        BIG,
        ", delay => '1 hour', priority => 5",
    );
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
        let verb = Verb::plain(name, 10, |_, _| sql.into());
        check(&mut held, "every message delayed or locked", "held", &verb);
    }
    fill(&mut admin, "held", 100_000, "");
    check_every_verb(
        &mut held,
        "ready messages behind a priority all locked or delayed",
        "held",
    );

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
    for verb in [
        Verb::plain("redrive", 10, |_, _| {
            "SELECT bussig.redrive('big', max_messages => 10)".into()
        }),
        Verb::plain("read", 10, |_, _| {
            "SELECT count(*) FROM bussig.read('big_dlq', 10)".into()
        }),
    ] {
        check(
            &mut redriving,
            "a dead-letter queue of a million",
            "big_dlq",
            &verb,
        );
    }
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
    let before = message_visits(&mut tx).0;
    let batch = read(&mut tx, "q", 10, None);
    assert_eq!(batch.len(), 10);
    let ids: Vec<i64> = batch.iter().map(|d| d.id).collect();
    let tokens: Vec<uuid::Uuid> = batch.iter().map(|d| d.token).collect();
    let settled: i64 = tx
        .query_one("SELECT bussig.ack_batch('q', $1, $2)", &[&ids, &tokens])
        .unwrap()
        .get(0);
    assert_eq!(settled, 10);
    let visited = message_visits(&mut tx).0 - before;
    assert!(
        visited < 100,
        "a read and an ack of 10 visited {visited} of the 20,000 messages"
    );
    tx.commit().unwrap();
}

/// Grouped messages and a capped queue, each filled after the last ANALYZE: the group statements find
/// their groups by key and the next in line through its own index, and a capped read's claim reads
/// free slots only, whatever the queue holds.
#[test]
fn grouped_and_capped_verbs_visit_rows_in_proportion_to_their_batch() {
    let (database, mut admin) = Database::without_worker("plan_groups");
    admin
        .batch_execute(
            "ALTER TABLE bussig.message SET (autovacuum_enabled = false);
             ALTER TABLE bussig.message_group SET (autovacuum_enabled = false);
             ALTER TABLE bussig.in_flight_slot SET (autovacuum_enabled = false);
             ANALYZE;
             SELECT bussig.create_queue('grouped');
             SELECT bussig.create_queue('capped', max_in_flight => 1000);",
        )
        .unwrap();
    // 200,000 messages over 20,000 groups: one head each, the rest parked behind it.
    admin
        .batch_execute(
            "SELECT bussig.send_batch('grouped', array_fill('{\"n\": 1}'::jsonb, ARRAY[10000]),
                                      group_ids => (SELECT array_agg('g' || ((i + k) % 20000)) FROM generate_series(1, 10000) k))
             FROM generate_series(0, 190000, 10000) i",
        )
        .unwrap();
    fill(&mut admin, "capped", BIG, "");
    let q = "grouped";
    let grouped = [
        Verb::plain("grouped send", 1, |_, _| {
            format!("SELECT bussig.send('{q}', '{{}}', group_id => 'g7')")
        }),
        Verb::plain("grouped send_batch", 10, |_, _| {
            format!(
                "SELECT bussig.send_batch('{q}', array_fill('{{}}'::jsonb, ARRAY[10]),
                                          group_ids => (SELECT array_agg('g' || k) FROM generate_series(1, 10) k))"
            )
        }),
        Verb::plain("read", 10, |_, _| {
            format!("SELECT count(*) FROM bussig.read('{q}', 10)")
        }),
        Verb::plain("peek", 10, |_, _| {
            format!("SELECT count(*) FROM bussig.peek('{q}', 10)")
        }),
        Verb::settling("ack", |ids, tokens| {
            format!("SELECT bussig.ack('{q}', ({ids})[1], ({tokens})[1])")
        }),
        Verb::settling("dead_letter", |ids, tokens| {
            format!("SELECT bussig.dead_letter('{q}', ({ids})[1], ({tokens})[1], reason => 'plan')")
        }),
        Verb::new("ack_batch", 10, 10, |ids, tokens| {
            format!("SELECT bussig.ack_batch('{q}', {ids}, {tokens})")
        }),
        Verb::new("ack_and_read", 20, 10, |ids, tokens| {
            format!("SELECT count(*) FROM bussig.ack_and_read('{q}', {ids}, {tokens}, 10)")
        }),
    ];
    let mut client = database.connect();
    for verb in &grouped {
        check(
            &mut client,
            "200,000 grouped messages after the last ANALYZE",
            q,
            verb,
        );
    }
    let q = "capped";
    let capped = [
        Verb::plain("read", 10, |_, _| {
            format!("SELECT count(*) FROM bussig.read('{q}', 10, lock_timeout => '1 second')")
        }),
        Verb::settling("ack", |ids, tokens| {
            format!("SELECT bussig.ack('{q}', ({ids})[1], ({tokens})[1])")
        }),
        Verb::settling("nack", |ids, tokens| {
            format!("SELECT bussig.nack('{q}', ({ids})[1], ({tokens})[1], delay => '1 hour')")
        }),
        Verb::settling("extend_lock", |ids, tokens| {
            format!("SELECT bussig.extend_lock('{q}', ({ids})[1], ({tokens})[1], '1 second')")
        }),
        Verb::new("ack_batch", 10, 10, |ids, tokens| {
            format!("SELECT bussig.ack_batch('{q}', {ids}, {tokens})")
        }),
        Verb::new("ack_and_read", 20, 10, |ids, tokens| {
            format!("SELECT count(*) FROM bussig.ack_and_read('{q}', {ids}, {tokens}, 10)")
        }),
    ];
    for verb in &capped {
        check(
            &mut client,
            "a million in a capped queue after the last ANALYZE",
            q,
            verb,
        );
    }
}
