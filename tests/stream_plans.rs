//! Stream statements visit rows in proportion to their batch, not to the stream, in the states a
//! stream ends up in: its tables are made at run time and never analyzed before they fill, a member
//! plans its statements while the stream is empty, and statistics may be taken while every record
//! still waits for its number (seq NULL everywhere).
//!
//! As `plan_stability` does for queues: PostgreSQL's counters of the stream's segment tables and
//! their indexes in the measuring transaction, live rows read (sequential scans and index fetches)
//! and pages read, after the statement ran often enough that the backend runs the plan it keeps.

use bussig_tests::*;

/// Records in the stream.
const RECORDS: i64 = 150_000;
const PER_RECORD: i64 = 4;
const SLACK: i64 = 40;
/// Pages a statement may read: its own work is tens; a walk of the stream thousands.
const BUFFERS: i64 = 1_000;
const WARM_UP: usize = 6;

/// Runs `sql` (given the transaction, so that it may prepare something first, unmeasured) once more
/// than WARM_UP times, each in a transaction of its own, and holds the last run's visits to the bound
/// for `batch` records.
fn check(
    client: &mut Client,
    state: &str,
    name: &str,
    batch: i64,
    mut sql: impl FnMut(&mut Transaction<'_>) -> String,
) {
    let mut visited = (0, 0);
    for _ in 0..=WARM_UP {
        let mut tx = client.transaction().unwrap();
        let statement = sql(&mut tx);
        let before = stream_visits(&mut tx, "s");
        tx.batch_execute(&statement)
            .unwrap_or_else(|e| panic!("{state}: {name}: {statement}: {e:?}"));
        let after = stream_visits(&mut tx, "s");
        visited = (after.0 - before.0, after.1 - before.1);
        tx.commit().unwrap();
    }
    let (rows, buffers) = visited;
    let bound = PER_RECORD * batch + SLACK;
    assert!(
        rows <= bound && buffers <= BUFFERS,
        "{state}: {name} of {batch} read {rows} live rows (at most {bound}) and {buffers} pages (at most {BUFFERS})"
    );
}

/// Every verb a member, a producer and a dashboard run, measured in `state`.
fn check_every_verb(member: &mut Client, state: &str) {
    // A member reads 100 and commits them, in one statement.
    check(member, state, "stream_read + stream_commit", 100, |_| {
        "WITH read AS (SELECT * FROM bussig.stream_read('s', 'g', 100))
         SELECT bussig.stream_commit('s', 'g', partition, max(seq), (array_agg(lease_token))[1])
         FROM read GROUP BY partition"
            .into()
    });
    check(member, state, "stream_range from the middle", 100, |_| {
        format!(
            "SELECT count(*) FROM bussig.stream_range('s', 0, {}, 100)",
            RECORDS / 2
        )
    });
    check(member, state, "append", 1, |_| {
        "SELECT bussig.append('s', '{\"n\": 1}')".into()
    });
    // The record just appended gets its number from this read.
    check(
        member,
        state,
        "a read that numbers one new record",
        100,
        |tx| {
            tx.batch_execute("SELECT bussig.append('s', '{\"n\": 2}')")
                .unwrap();
            "SELECT count(*) FROM bussig.stream_read('s', 'g', 100)".into()
        },
    );
    check(member, state, "stream_seek", 1, |_| {
        format!(
            "SELECT bussig.stream_seek('s', 'other', 0, {})",
            RECORDS / 3
        )
    });
    check(member, state, "the consumer_groups view", 2, |_| {
        "SELECT count(*) FROM bussig.consumer_groups WHERE stream = 's'".into()
    });
    check(member, state, "the streams view", 1, |_| {
        "SELECT count(*) FROM bussig.streams WHERE stream = 's'".into()
    });
    // The worker's look, before it empties a segment of shared bodies, for a record still referring
    // to one: the partial index on body_segment, not the stream's records.
    check(member, state, "stream_body_referenced", 1, |_| {
        "SELECT bussig.stream_body_referenced(0)".into()
    });
}

/// Stream 's' (one partition) made anew with groups 'g' and 'other' at its start, its segment tables
/// kept from autovacuum, so that no ANALYZE comes along and replaces the statistics of a state.
fn make_stream(admin: &mut Client) {
    admin
        .batch_execute(
            "SELECT bussig.drop_stream('s');
             SELECT bussig.create_stream('s');
             SELECT bussig.create_consumer_group('s', 'g', 'earliest');
             SELECT bussig.create_consumer_group('s', 'other', 'earliest');",
        )
        .unwrap();
    for segment in &segment_tables(admin) {
        admin
            .batch_execute(&format!(
                "ALTER TABLE {segment} SET (autovacuum_enabled = false)"
            ))
            .unwrap();
    }
}

/// The segment tables of stream 's'.
fn segment_tables(admin: &mut Client) -> Vec<String> {
    admin
        .query(
            "SELECT inhrelid::regclass::text FROM pg_inherits
             WHERE inhparent = ('bussig.stream_' || (SELECT stream_id FROM bussig.stream WHERE name = 's'))::regclass",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// `RECORDS` records appended in batches of 10,000.
fn fill(admin: &mut Client) {
    admin
        .batch_execute(&format!(
            "SELECT bussig.append_batch('s', array_fill('{{\"n\": 0}}'::jsonb, ARRAY[least(10000, {RECORDS} - i)]::int[]))
             FROM generate_series(0, {RECORDS} - 1, 10000) i"
        ))
        .unwrap();
}

/// Gives every record its number, as the first reads do (a pass numbers 100,000 at most).
fn number(admin: &mut Client) {
    for _ in 0..2 {
        admin
            .batch_execute("SELECT count(*) FROM bussig.stream_range('s', 0, 1, 1)")
            .unwrap();
    }
    let head: i64 = admin
        .query_one(
            "SELECT head_seq FROM bussig.stream_partition JOIN bussig.stream USING (stream_id) WHERE name = 's'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(head, RECORDS, "every record numbered");
}

#[test]
fn stream_verbs_visit_rows_in_proportion_to_their_batch() {
    let database = Database::create("stream_plans");
    let mut admin = database.connect();
    admin.batch_execute("CREATE EXTENSION bussig").unwrap();
    make_stream(&mut admin);
    // A member plans its statements while the stream is empty, past the plan cache's custom plans.
    let mut member = database.connect();
    for _ in 0..WARM_UP {
        assert!(stream_read(&mut member, "s", "g", 100, "0", "30 seconds").is_empty());
        member
            .batch_execute("SELECT count(*) FROM bussig.stream_range('s', 0, 1, 100)")
            .unwrap();
    }
    fill(&mut admin);
    number(&mut admin);
    check_every_verb(
        &mut member,
        "plans made on the empty stream, never analyzed",
    );

    // Statistics taken while every record waited for its number: seq NULL in every row sampled. A
    // new backend plans from them.
    make_stream(&mut admin);
    fill(&mut admin);
    admin
        .batch_execute(
            "DO $$ BEGIN
                 EXECUTE format('ANALYZE bussig.stream_%s', (SELECT stream_id FROM bussig.stream WHERE name = 's'));
             END $$",
        )
        .unwrap();
    number(&mut admin);
    let mut member = database.connect();
    check_every_verb(
        &mut member,
        "analyzed while every record waited for its number",
    );

    // Retention empties the segment holding every record: under that segment's lock, which every
    // reader waits for, it finds each partition's last seq by one probe of the numbered records'
    // index, not by reading the segment. The worker is kept out, so that the step is this one's.
    keep_worker_out(&mut admin);
    let of_s = "stream_id = (SELECT stream_id FROM bussig.stream WHERE name = 's')";
    admin
        .batch_execute(&format!(
            "UPDATE bussig.stream_segment SET opened_at = opened_at - interval '30 days'
             WHERE {of_s} AND opened_at IS NOT NULL AND closed_at IS NULL;
             SELECT bussig.run_maintenance();
             UPDATE bussig.stream_segment SET closed_at = closed_at - interval '30 days'
             WHERE {of_s} AND closed_at IS NOT NULL;"
        ))
        .unwrap();
    // Vacuumed first: the step numbers what waits before it locks the segment, and a backend that
    // learnt no floor walks the entries numbering left (unless earlier scans marked them dead, which
    // a snapshot held anywhere in the database at that moment prevents).
    for segment in segment_tables(&mut admin) {
        admin.batch_execute(&format!("VACUUM {segment}")).unwrap();
    }
    let mut tx = admin.transaction().unwrap();
    let before = stream_visits(&mut tx, "s");
    let emptied: i64 = tx
        .query_one(
            "SELECT (bussig.run_maintenance() ->> 'emptied_stream_segments')::bigint",
            &[],
        )
        .unwrap()
        .get(0);
    let after = stream_visits(&mut tx, "s");
    tx.commit().unwrap();
    assert_eq!(emptied, 1, "the segment of every record was emptied");
    let (rows, buffers) = (after.0 - before.0, after.1 - before.1);
    assert!(
        rows <= SLACK && buffers <= BUFFERS,
        "retention read {rows} live rows and {buffers} pages of the stream's segments"
    );
}
