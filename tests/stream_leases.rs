//! Leases of consumer groups live in an unlogged table: a read that numbers nothing writes no WAL,
//! and leases lost as a crash loses them end like expired ones, with nothing lost or committed twice.
use serde_json::Value;

use bussig_tests::*;

fn append(c: &mut Client, stream: &str, count: i32) {
    c.execute(
        "SELECT bussig.append_batch($1::text, array_agg(to_jsonb(n))) FROM generate_series(1, $2::int) n",
        &[&stream, &count],
    )
    .unwrap();
}

fn seqs(records: &[Record]) -> Vec<i64> {
    records.iter().map(|r| r.seq).collect()
}

/// The WAL records the statement wrote, nested statements included, and the rows it returned.
fn wal_records(c: &mut Client, sql: &str) -> (i64, i64) {
    let plan: Value = c
        .query_one(&format!("EXPLAIN (ANALYZE, WAL, FORMAT JSON) {sql}"), &[])
        .unwrap()
        .get(0);
    let top = &plan[0]["Plan"];
    (
        top["WAL Records"].as_i64().expect("WAL Records"),
        top["Actual Rows"].as_i64().expect("Actual Rows"),
    )
}

#[test]
fn a_read_of_numbered_records_writes_no_wal_and_a_commit_does() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "lease_wal", "");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "earliest");
    append(&mut admin, &name, 10);
    let mut member = connect();
    // The first read numbers the records (a write of each); the next finds nothing new to number.
    let first = stream_read(&mut member, &name, "g", 2, "0", "30 seconds");
    assert_eq!(seqs(&first), [1, 2]);
    assert!(commit_all(&mut member, &name, "g", &first));
    let second = stream_read(&mut member, &name, "g", 2, "0", "30 seconds");
    assert_eq!(seqs(&second), [3, 4]);
    assert!(commit_all(&mut member, &name, "g", &second));
    let table: String = admin
        .query_one(
            "SELECT format('bussig.stream_%s', stream_id) FROM bussig.stream WHERE name = $1::text",
            &[&name],
        )
        .unwrap()
        .get(0);
    // Without dead rows a read's scan has nothing to prune (a prune would write WAL).
    admin.batch_execute(&format!("VACUUM {table}")).unwrap();
    let (wal, rows) = wal_records(
        &mut member,
        &format!("SELECT * FROM bussig.stream_read('{name}', 'g', 3)"),
    );
    assert_eq!((wal, rows), (0, 3), "a read that took a lease wrote WAL");
    let token: uuid::Uuid = member
        .query_one(
            "SELECT lease_token FROM bussig.group_lease l JOIN bussig.stream s USING (stream_id)
             WHERE s.name = $1::text AND l.lease_token IS NOT NULL",
            &[&name],
        )
        .unwrap()
        .get(0);
    let (wal, _) = wal_records(
        &mut member,
        &format!("SELECT bussig.stream_commit('{name}', 'g', 0, 7, '{token}')"),
    );
    assert!(wal > 0, "a commit of the group's position wrote no WAL");
}

#[test]
fn leases_lost_as_in_a_crash_end_like_expired_ones() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "lease_lost", "partitions => 2");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "earliest");
    admin
        .execute(
            "SELECT bussig.append_batch($1::text, array_agg(to_jsonb(n)), keys => array_agg('k' || n))
             FROM generate_series(1, 20) n",
            &[&name],
        )
        .unwrap();
    let mut member = connect();
    let taken = stream_read(&mut member, &name, "g", 100, "0", "10 minutes");
    assert_eq!(taken.len(), 20);
    let leased: i64 = admin
        .query_one(
            "SELECT count(leased_until) FROM bussig.consumer_groups WHERE stream = $1::text",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(leased, 2, "both partitions leased, and the view says so");
    // A crash leaves the unlogged table empty. Removing this stream's rows does the same to a running
    // server without touching the leases of tests running beside this one.
    admin
        .execute(
            "DELETE FROM bussig.group_lease WHERE stream_id = (SELECT stream_id FROM bussig.stream WHERE name = $1::text)",
            &[&name],
        )
        .unwrap();
    assert!(
        !commit_all(&mut member, &name, "g", &taken),
        "a lease lost in the crash committed"
    );
    // Another member, and the one that read first, get the records again: nothing was committed.
    let mut other = connect();
    let again = stream_read(&mut other, &name, "g", 100, "0", "30 seconds");
    let mut again_seqs: Vec<(i32, i64)> = again.iter().map(|r| (r.partition, r.seq)).collect();
    let mut taken_seqs: Vec<(i32, i64)> = taken.iter().map(|r| (r.partition, r.seq)).collect();
    again_seqs.sort();
    taken_seqs.sort();
    assert_eq!(again_seqs, taken_seqs);
    assert!(commit_all(&mut other, &name, "g", &again));
    assert!(stream_read(&mut member, &name, "g", 100, "0", "30 seconds").is_empty());
    let lag: i64 = admin
        .query_one(
            "SELECT sum(lag)::bigint FROM bussig.consumer_groups WHERE stream = $1::text",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(lag, 0);
}
