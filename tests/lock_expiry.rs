//! A lock that runs out makes the message deliverable again under a new
//! token; extend_lock pushes the expiry out for the current token only.

use std::time::{Duration, SystemTime};

use bussig_tests::*;
use uuid::Uuid;

#[test]
fn lock_expiry() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "lock_expiry", "");
    let q = queue.name.as_str();

    // Expiry: redelivered with a new token and a higher count.
    let id = send(&mut client, q, &json!({ "k": "expires" }));
    let old = read(&mut client, q, 1, Some("1 second"))
        .pop()
        .expect("first delivery");
    assert_eq!((old.id, old.delivery_count), (id, 1));
    assert!(
        read_one(&mut client, q).is_none(),
        "locked message delivered twice"
    );

    let new = eventually(
        Duration::from_secs(10),
        "redelivery after lock expiry",
        || read_one(&mut client, q),
    );
    assert_eq!((new.id, new.delivery_count), (id, 2));
    assert_ne!(new.token, old.token, "redelivery must use a new token");
    assert!(
        !extend_lock(&mut client, q, id, old.token, "1 minute"),
        "stale token extended"
    );
    assert!(!ack(&mut client, q, id, old.token), "stale token acked");
    assert!(
        ack(&mut client, q, id, new.token),
        "current token did not ack"
    );

    // extend_lock: still locked after the original 1 s would have run out.
    let id = send(&mut client, q, &json!({ "k": "extended" }));
    let d = read(&mut client, q, 1, Some("1 second"))
        .pop()
        .expect("delivery");
    assert_eq!(d.id, id);
    let original_expiry: SystemTime = client
        .query_one("SELECT clock_timestamp() + interval '1 second'", &[])
        .unwrap()
        .get(0);
    assert!(
        extend_lock(&mut client, q, id, d.token, "1 minute"),
        "extend_lock failed"
    );
    assert!(
        !extend_lock(&mut client, q, id, Uuid::nil(), "1 minute"),
        "unknown token extended"
    );

    eventually(
        Duration::from_secs(10),
        "the original lock expiry to pass",
        || {
            let row = client.query_one("SELECT clock_timestamp() > $1", &[&original_expiry]);
            row.unwrap().get::<_, bool>(0).then_some(())
        },
    );
    assert!(
        read_one(&mut client, q).is_none(),
        "extended lock expired early"
    );
    assert_eq!(peek(&mut client, q)[0].state, "locked");
    assert!(
        ack(&mut client, q, id, d.token),
        "extended token did not ack"
    );
}

/// `bussig.extend_lock(queue, id, token, timeout)`.
fn extend_lock(c: &mut Client, q: &str, id: i64, token: Uuid, timeout: &str) -> bool {
    let sql = "SELECT bussig.extend_lock($1::text, $2::bigint, $3::uuid, $4::text::interval)";
    c.query_one(sql, &[&q, &id, &token, &timeout])
        .expect("extend_lock")
        .get(0)
}
