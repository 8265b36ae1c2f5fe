//! Every bussig call runs in the caller's transaction: a rollback undoes
//! sends, reads (locks and delivery counts) and acks alike.

use bussig_tests::*;

#[test]
fn transactions() {
    let mut client = connect();
    let mut other = connect();
    let queue = Queue::create(&mut client, "transactions", "");
    let q = queue.name.as_str();

    // A rolled-back send is never delivered.
    let mut tx = client.transaction().unwrap();
    send(&mut tx, q, &json!({ "rolled": "back" }));
    tx.rollback().unwrap();
    assert!(
        read(&mut client, q, 10, None).is_empty(),
        "rolled-back send was delivered"
    );
    assert!(
        peek(&mut client, q).is_empty(),
        "rolled-back send is visible to peek"
    );

    // An uncommitted send is invisible to other connections until commit.
    let mut tx = client.transaction().unwrap();
    let id = send(&mut tx, q, &json!({ "k": 1 }));
    assert!(
        read_one(&mut other, q).is_none(),
        "uncommitted send was delivered"
    );
    tx.commit().unwrap();

    // A rolled-back read leaves the message ready with its count unchanged.
    let mut tx = client.transaction().unwrap();
    let first = read_one(&mut tx, q).expect("committed send is readable");
    assert_eq!((first.id, first.delivery_count), (id, 1));
    tx.rollback().unwrap();
    let seen = peek(&mut client, q);
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].state.as_str(), seen[0].delivery_count),
        ("ready", 0)
    );
    assert!(
        !ack(&mut client, q, id, first.token),
        "token of a rolled-back read acked"
    );

    let second = read_one(&mut client, q).expect("message is ready again after rollback");
    assert_eq!((second.id, second.delivery_count), (id, 1));
    assert_ne!(
        second.token, first.token,
        "a new read must get a fresh token"
    );
    assert!(
        !ack(&mut client, q, id, first.token),
        "token of a rolled-back read acked"
    );

    // A rolled-back ack leaves the message locked under the same token.
    let mut tx = client.transaction().unwrap();
    assert!(ack(&mut tx, q, id, second.token));
    tx.rollback().unwrap();
    let seen = peek(&mut client, q);
    assert_eq!(seen.len(), 1, "rolled-back ack removed the message");
    assert_eq!(seen[0].state, "locked");
    assert!(
        ack(&mut client, q, id, second.token),
        "token should still ack after rollback"
    );
    assert!(peek(&mut client, q).is_empty());
}
