//! Reads pass over message versions that another transaction has taken, without trying to lock them
//! (`bussig.superseded`): replaced by a commit after the read's snapshot was taken, or updated or
//! row-locked by a transaction still in progress. A reader holding an old snapshot sees each kind of
//! version: replaced by a read or an ack, or held by another open transaction (skipped); only
//! row-locked by a transaction that committed, updated by one that rolled back, row-locked by the
//! reader's own transaction, or untouched (left to FOR UPDATE SKIP LOCKED).
use bussig_tests::*;

/// Message `id` row-locked by `c`'s transaction, as a reader's FOR UPDATE locks it.
fn row_lock(c: &mut impl GenericClient, id: i64) {
    c.execute(
        "SELECT FROM bussig.message WHERE message_id = $1 FOR UPDATE",
        &[&id],
    )
    .unwrap();
}

/// Message `id` updated by `c`'s transaction.
fn row_update(c: &mut impl GenericClient, id: i64) {
    c.execute(
        "UPDATE bussig.message SET priority = 7 WHERE message_id = $1",
        &[&id],
    )
    .unwrap();
}

#[test]
fn only_versions_another_transaction_took_are_superseded() {
    let mut admin = connect();
    let queue = Queue::create(&mut admin, "superseded", "");
    let ids: Vec<i64> = (0..8)
        .map(|n| send(&mut admin, &queue.name, &json!({ "n": n })))
        .collect();

    let mut stale = connect();
    let mut snapshot = stale.transaction().unwrap();
    snapshot
        .batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .unwrap();
    let versions: Vec<String> = ids
        .iter()
        .map(|id| {
            snapshot
                .query_one(
                    "SELECT ctid::text FROM bussig.message WHERE message_id = $1",
                    &[id],
                )
                .unwrap()
                .get(0)
        })
        .collect();

    // 0 is read (its lock replaces the row), 1 read and acked, 2 only locked FOR UPDATE by a
    // transaction that committed, 3 updated by one that rolled back, 4 left alone.
    let first = read(&mut admin, &queue.name, 2, None);
    assert_eq!(first.iter().map(|d| d.id).collect::<Vec<_>>(), ids[..2]);
    assert!(ack(&mut admin, &queue.name, first[1].id, first[1].token));
    let mut locker = admin.transaction().unwrap();
    row_lock(&mut locker, ids[2]);
    locker.commit().unwrap();
    let mut undone = admin.transaction().unwrap();
    row_update(&mut undone, ids[3]);
    undone.rollback().unwrap();
    // 5 row-locked and 6 updated by a transaction still open, 7 row-locked by the reader itself.
    let mut holding = connect();
    let mut holder = holding.transaction().unwrap();
    row_lock(&mut holder, ids[5]);
    row_update(&mut holder, ids[6]);
    row_lock(&mut snapshot, ids[7]);

    let superseded: Vec<bool> = versions
        .iter()
        .map(|version| {
            snapshot
                .query_one(
                    "SELECT bussig.superseded('bussig.message'::regclass, $1::text::tid)",
                    &[version],
                )
                .unwrap()
                .get(0)
        })
        .collect();
    assert_eq!(
        superseded,
        [true, true, false, false, false, true, true, false]
    );
    snapshot.commit().unwrap();
    holder.rollback().unwrap();

    // Whatever the old snapshot saw, the queue still hands out exactly the six unread messages.
    let rest: Vec<i64> = read(&mut admin, &queue.name, 10, None)
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(rest, ids[2..]);
}

#[test]
fn superseded_is_not_for_everyone() {
    let role = Role::create("superseded");
    let mut admin = connect();
    let mut as_role = admin.transaction().unwrap();
    as_role
        .batch_execute(&format!("SET LOCAL ROLE \"{}\"", role.name))
        .unwrap();
    let error = as_role
        .query_one(
            "SELECT bussig.superseded('bussig.message'::regclass, '(0,1)')",
            &[],
        )
        .unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("42501"));
}
