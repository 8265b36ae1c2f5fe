//! bussig keeps its statements' plans for the life of a backend. Plans made while the message table was
//! empty (a drained queue, vacuumed) must still go by the indexes, in order, once a backlog has built
//! up: neither a sequential nor a bitmap scan of the whole table.

use bussig_tests::*;

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

    // Counted within the transaction, but a pooled backend's counts may still hold its earlier
    // transactions' (CREATE EXTENSION scans the table to build its indexes): take the difference.
    let rows_visited = |tx: &mut Transaction<'_>| -> i64 {
        tx.query_one(
            "SELECT seq_tup_read + idx_tup_fetch FROM pg_stat_xact_user_tables
             WHERE relid = 'bussig.message'::regclass",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let mut tx = consumer.transaction().unwrap();
    let before = rows_visited(&mut tx);
    let batch = read(&mut tx, "q", 10, None);
    assert_eq!(batch.len(), 10);
    let ids: Vec<i64> = batch.iter().map(|d| d.id).collect();
    let tokens: Vec<uuid::Uuid> = batch.iter().map(|d| d.token).collect();
    let settled: i64 = tx
        .query_one("SELECT bussig.ack_batch('q', $1, $2)", &[&ids, &tokens])
        .unwrap()
        .get(0);
    assert_eq!(settled, 10);
    let visited = rows_visited(&mut tx) - before;
    assert!(
        visited < 100,
        "a read and an ack of 10 visited {visited} of the 20,000 messages"
    );
    tx.commit().unwrap();
}
