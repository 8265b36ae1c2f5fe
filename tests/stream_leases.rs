//! Leases of consumer groups live in an unlogged table: a read that numbers nothing writes no WAL,
//! and leases lost as a crash loses them end like expired ones, with nothing lost or committed twice.
//! A reader skips numbering while no append committed since it last found nothing to number; an
//! append committed by COMMIT PREPARED counts no arrival, and is numbered all the same.
use std::time::Duration;

use serde_json::Value;

use bussig_tests::*;

/// Removes the stream's lease rows, as a crash empties the unlogged table, without touching the
/// leases of tests running beside this one.
fn lose_leases(admin: &mut Client, stream: &str) {
    admin
        .execute(
            "DELETE FROM bussig.group_lease WHERE stream_id = (SELECT stream_id FROM bussig.stream WHERE name = $1::text)",
            &[&stream],
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
    append_numbers(&mut admin, &name, 10, false);
    // A backend of its own: what it remembers between statements is what is tested.
    let mut member = connect_session();
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
    // Without dead rows a read's scan has nothing to prune (a prune would write WAL). A snapshot of
    // a test running beside this one can keep VACUUM from removing them, and the read prunes them
    // once it ends: so a read writes none in one of a few tries, each after a VACUUM.
    let lease_token = |member: &mut Client| -> uuid::Uuid {
        member
            .query_one(
                "SELECT lease_token FROM bussig.group_lease l JOIN bussig.stream s USING (stream_id)
                 WHERE s.name = $1::text AND l.lease_token IS NOT NULL",
                &[&name],
            )
            .unwrap()
            .get(0)
    };
    let mut tries = Vec::new();
    loop {
        admin.batch_execute(&format!("VACUUM {table}")).unwrap();
        let (wal, rows) = wal_records(
            &mut member,
            &format!("SELECT * FROM bussig.stream_read('{name}', 'g', 1)"),
        );
        assert_eq!(rows, 1);
        tries.push(wal);
        if wal == 0 {
            break;
        }
        assert!(
            tries.len() < 4,
            "every read that took a lease wrote WAL: {tries:?}"
        );
        // Records 5, 6, ... one a try.
        let (seq, token) = (4 + tries.len() as i64, lease_token(&mut member));
        member
            .execute(
                "SELECT bussig.stream_commit($1::text, 'g', 0, $2, $3)",
                &[&name, &seq, &token],
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let token = lease_token(&mut member);
    let seq = 4 + tries.len() as i64;
    let (wal, _) = wal_records(
        &mut member,
        &format!("SELECT bussig.stream_commit('{name}', 'g', 0, {seq}, '{token}')"),
    );
    assert!(wal > 0, "a commit of the group's position wrote no WAL");
}

/// A transaction that writes nothing but a group's position commits without waiting for the WAL
/// flush (losing it only makes the group read the records again); one that also writes rows of its
/// own commits as the caller's settings say. Either way the caller's synchronous_commit is as it was.
#[test]
fn a_commit_of_positions_only_leaves_the_callers_synchronous_commit_as_it_was() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "lease_async", "");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "earliest");
    append_numbers(&mut admin, &name, 4, false);
    let mut member = connect_session();
    member
        .batch_execute("SET synchronous_commit = 'remote_write'")
        .unwrap();
    let setting =
        |c: &mut Client| -> String { c.query_one("SHOW synchronous_commit", &[]).unwrap().get(0) };
    let first = stream_read(&mut member, &name, "g", 2, "0", "30 seconds");
    assert!(commit_all(&mut member, &name, "g", &first));
    assert_eq!(setting(&mut member), "remote_write");

    let table = unique_name("own_rows");
    admin
        .batch_execute(&format!("CREATE TABLE \"{table}\" (seq bigint)"))
        .unwrap();
    let mut tx = member.transaction().unwrap();
    let second = stream_read(&mut tx, &name, "g", 2, "0", "30 seconds");
    assert!(commit_all(&mut tx, &name, "g", &second));
    for record in &second {
        tx.execute(
            &format!("INSERT INTO \"{table}\" VALUES ($1)"),
            &[&record.seq],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    assert_eq!(setting(&mut member), "remote_write");
    let (kept, committed): (i64, i64) = {
        let row = admin
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM \"{table}\"),
                            (SELECT committed_seq FROM bussig.consumer_groups WHERE stream = $1::text)"
                ),
                &[&name],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((kept, committed), (2, 4));
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .unwrap();
}

#[test]
fn leases_lost_as_in_a_crash_end_like_expired_ones() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "lease_lost", "partitions => 2");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "earliest");
    append_numbers(&mut admin, &name, 20, true);
    // A backend of its own: what it remembers between statements is what is tested.
    let mut member = connect_session();
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
    // As a crash leaves them.
    lose_leases(&mut admin, &name);
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
    assert_eq!(total_lag(&mut admin, &name), 0);
}

#[test]
fn an_append_committed_by_commit_prepared_is_read() {
    let mut admin = connect();
    let prepared: i32 = admin
        .query_one(
            "SELECT current_setting('max_prepared_transactions')::int",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        prepared > 0,
        "the test server needs max_prepared_transactions (.ci/cluster.sh sets it)"
    );
    let stream = Stream::create(&mut admin, "lease_prepared", "");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "earliest");
    // A backend of its own: what it remembers between statements is what is tested.
    let mut member = connect_session();
    // Found with nothing to number: the member's next reads skip the partition while no arrival comes.
    assert!(stream_read(&mut member, &name, "g", 10, "0", "30 seconds").is_empty());
    let mut appender = connect();
    let gid = format!("{name}-append");
    appender
        .batch_execute(&format!(
            "BEGIN; SELECT bussig.append_batch('{name}', ARRAY['1', '2', '3']::jsonb[]); PREPARE TRANSACTION '{gid}'"
        ))
        .unwrap();
    admin
        .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
        .unwrap();
    let read = eventually(
        Duration::from_secs(10),
        "the prepared append's records",
        || {
            let records = stream_read(&mut member, &name, "g", 10, "0", "30 seconds");
            (!records.is_empty()).then_some(records)
        },
    );
    assert_eq!(seqs(&read), [1, 2, 3]);
    assert!(commit_all(&mut member, &name, "g", &read));
}

/// A client test's three records appended in their own transaction, and the member that reads them.
fn three_records(test: &str) -> (Stream, Client, Client) {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, test, "");
    create_group(&mut admin, &stream.name, "g", "earliest");
    append_numbers(&mut admin, &stream.name, 3, false);
    let member = connect_session();
    (stream, admin, member)
}

/// Reads the three records in a transaction, reads again there (finding nothing), rolls it back, and
/// reads them again: what the transaction did that the second read found must not outlive it.
fn read_twice_and_roll_back(member: &mut Client, name: &str, what: &str) {
    member.batch_execute("BEGIN").unwrap();
    assert_eq!(
        seqs(&stream_read(member, name, "g", 10, "0", "30 seconds")),
        [1, 2, 3]
    );
    assert!(stream_read(member, name, "g", 10, "0", "30 seconds").is_empty());
    member.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        seqs(&stream_read(member, name, "g", 10, "0", "30 seconds")),
        [1, 2, 3],
        "{what}"
    );
}

#[test]
fn a_rolled_back_numbering_is_done_again_by_the_next_read() {
    let (stream, _admin, mut member) = three_records("lease_numbering_rollback");
    // The first read numbers the records, and the second finds nothing new to number.
    read_twice_and_roll_back(
        &mut member,
        &stream.name,
        "the numbers were rolled back, and the read did not number again",
    );
}

#[test]
fn a_repeatable_read_reader_that_missed_an_append_reads_it_after() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "lease_repeatable_read", "");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "earliest");
    // A backend of its own: what it remembers between statements is what is tested.
    let mut member = connect_session();
    member
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .unwrap();
    append_numbers(&mut admin, &name, 3, false);
    // Its snapshot is older than the append's commit, which the arrival count has seen already.
    assert!(stream_read(&mut member, &name, "g", 10, "0", "30 seconds").is_empty());
    member.batch_execute("COMMIT").unwrap();
    assert_eq!(
        seqs(&stream_read(&mut member, &name, "g", 10, "0", "30 seconds")),
        [1, 2, 3]
    );
}

#[test]
fn lease_rows_made_again_in_a_rolled_back_transaction_are_made_once_more() {
    let (stream, mut admin, mut member) = three_records("lease_rows_rollback");
    let name = stream.name.clone();
    lose_leases(&mut admin, &name);
    // The first read makes the lease rows, and the second finds them: its own.
    read_twice_and_roll_back(
        &mut member,
        &name,
        "no lease rows after the rollback, and the read did not make them again",
    );
}
