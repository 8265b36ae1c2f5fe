//! Numbering looks only past the record ids it knows are numbered or rolled back (the partition's
//! floor, `src/stream/sequence.rs`): under a held snapshot, whose dead versions nothing can remove, a
//! read visits index entries in proportion to its batch, not to the records numbered since the snapshot was
//! taken. A floor never passes a record that commits later: one appended by a transaction still
//! open, or prepared.
use std::time::Duration;

use bussig_tests::*;

/// One round of a member: read up to `max` and commit them; how many it read.
fn read_and_commit(member: &mut Client, stream: &str, max: i32) -> usize {
    let mut tx = member.transaction().unwrap();
    let records = stream_read(&mut tx, stream, "g", max, "0", "30 seconds");
    assert!(commit_all(&mut tx, stream, "g", &records));
    tx.commit().unwrap();
    records.len()
}

/// A database of its own with stream `events` of one partition and its group `g` from the earliest:
/// floors are not learnt while a transaction of the database is prepared, and other tests here
/// prepare one. The database, its admin connection and the stream's name.
fn own_database(test: &str) -> (Database, Client, String) {
    let db = Database::create(test);
    let mut admin = db.connect();
    admin
        .batch_execute(
            "CREATE EXTENSION bussig;
             SELECT bussig.create_stream('events', partitions => 1);",
        )
        .unwrap();
    let name = "events".to_string();
    create_group(&mut admin, &name, "g", "earliest");
    (db, admin, name)
}

#[test]
fn under_a_held_snapshot_a_read_visits_entries_in_proportion_to_its_batch() {
    let (db, mut admin, name) = own_database("floor_held");
    let mut holder = db.connect();
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT txid_current();")
        .unwrap();
    // A backend of its own: the floor is what it learnt.
    let mut member = db.connect();
    for _ in 0..60 {
        append_numbers(&mut admin, &name, 100, false);
        assert_eq!(read_and_commit(&mut member, &name, 100), 100);
    }
    // Time for the floor to be learnt again, and taken on once the pass that learnt it committed.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(150));
        append_numbers(&mut admin, &name, 100, false);
        assert_eq!(read_and_commit(&mut member, &name, 100), 100);
    }
    append_numbers(&mut admin, &name, 100, false);
    let mut tx = member.transaction().unwrap();
    let before = stream_visits(&mut tx, &name);
    let records = stream_read(&mut tx, &name, "g", 100, "0", "30 seconds");
    let after = stream_visits(&mut tx, &name);
    assert_eq!(records.len(), 100);
    tx.commit().unwrap();
    // Index entries returned and rows read: 6,200 records were numbered under the snapshot, and a
    // walk of their unnumbered versions returns an entry for each (pages say less: the walk reads
    // the records' pages in order, each once).
    let (visited, pages) = (after.0 - before.0, after.1 - before.1);
    assert!(
        visited < 2_000,
        "a read of 100 visited {visited} entries and rows ({pages} pages)"
    );
    holder.batch_execute("COMMIT").unwrap();
}

/// Appends one record in a transaction left open (or prepared), lets the member number other records
/// for longer than a floor takes to be learnt, then ends it: the record is read.
fn a_late_record_is_read(test: &str, prepare: bool) {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, test, "partitions => 1");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "earliest");
    let mut member = connect_session();
    let mut late = connect_session();
    let gid = format!("{name}-late");
    late.batch_execute(&format!(
        "BEGIN; SELECT bussig.append('{name}', '\"late\"');"
    ))
    .unwrap();
    if prepare {
        late.batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
            .unwrap();
    }
    let mut read = 0;
    for _ in 0..8 {
        append_numbers(&mut admin, &name, 10, false);
        read += read_and_commit(&mut member, &name, 100);
        std::thread::sleep(Duration::from_millis(60));
    }
    assert_eq!(read, 80);
    let end = if prepare {
        format!("COMMIT PREPARED '{gid}'")
    } else {
        "COMMIT".to_string()
    };
    late.batch_execute(&end).unwrap();
    let records = eventually(Duration::from_secs(10), "the late record", || {
        let mut tx = member.transaction().unwrap();
        let records = stream_read(&mut tx, &name, "g", 100, "0", "30 seconds");
        tx.commit().unwrap();
        (!records.is_empty()).then_some(records)
    });
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].payload, serde_json::json!("late"));
    assert_eq!(records[0].seq, 81);
}

#[test]
fn a_record_of_a_transaction_left_open_is_read_once_it_commits() {
    a_late_record_is_read("floor_open", false);
}

#[test]
fn a_record_of_a_prepared_transaction_is_read_once_it_commits() {
    a_late_record_is_read("floor_prepared", true);
}

/// A read that may wait numbers in a subtransaction, and rolls it back when it leased nothing (a
/// caller's savepoint may roll back a read too): the numbers go, and so must the floor that pass
/// learnt, or the backend would never number those records again while its transaction commits.
#[test]
fn a_numbering_rolled_back_with_its_subtransaction_moves_no_floor() {
    let (db, mut admin, name) = own_database("floor_rolled_back");
    // Sessions of their own: the floor is what the member's backend learnt.
    let session = || Client::connect(&session_url_for(&db.name), NoTls).unwrap();
    let (mut holder, mut member) = (session(), session());
    append_numbers(&mut admin, &name, 1, false);
    let held = stream_read(&mut holder, &name, "g", 10, "0", "30 seconds");
    assert_eq!(held.len(), 1, "the holder's lease");
    append_numbers(&mut admin, &name, 5, false);
    // The member numbers the five, finds the partition leased, and rolls its pass back.
    let nothing = stream_read(
        &mut member,
        &name,
        "g",
        10,
        "200 milliseconds",
        "30 seconds",
    );
    assert!(nothing.is_empty(), "read a partition another member leased");
    assert!(commit_all(&mut holder, &name, "g", &held));
    let records = stream_read(&mut member, &name, "g", 10, "0", "30 seconds");
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![2, 3, 4, 5, 6],
        "the records numbered and rolled back"
    );
}
