//! Each backend caches the queues it used by name, so that `send` and `ack` are one plain statement.
//! These tests hold one session (one backend, its cache warm) while other connections change the
//! queues under it: every change must reach the cache before the backend's next call.

use std::time::Duration;

use bussig_tests::*;
use postgres::fallible_iterator::FallibleIterator;

#[test]
fn a_queue_dropped_and_created_again_elsewhere_gets_the_next_send() {
    let mut cached = connect_session();
    let mut other = connect();
    let queue = Queue::create(&mut other, "cache_recreated", "");
    let q = queue.name.as_str();
    send(&mut cached, q, &json!({ "to": "the first queue" }));

    other
        .execute("SELECT bussig.drop_queue($1::text)", &[&q])
        .unwrap();
    other
        .execute("SELECT bussig.create_queue($1::text)", &[&q])
        .unwrap();
    let id = send(&mut cached, q, &json!({ "to": "the second queue" }));

    let delivered = read(&mut other, q, 10, None);
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0].id, id);
    assert_eq!(delivered[0].payload, json!({ "to": "the second queue" }));
    assert!(ack(&mut cached, q, id, delivered[0].token));
}

#[test]
fn a_dropped_queue_is_unknown_to_a_backend_that_used_it() {
    let mut cached = connect_session();
    let mut other = connect();
    let queue = Queue::create(&mut other, "cache_dropped", "");
    let q = queue.name.as_str();
    send(&mut cached, q, &json!({ "n": 1 }));
    other
        .execute("SELECT bussig.drop_queue($1::text)", &[&q])
        .unwrap();

    let error = cached
        .query_one("SELECT bussig.send($1::text, '{}')", &[&q])
        .expect_err("send to a dropped queue succeeded");
    assert_eq!(error.code(), Some(&SqlState::UNDEFINED_OBJECT), "{error}");
    let error = cached
        .query_one(
            "SELECT bussig.ack_batch($1::text, ARRAY[1]::bigint[], ARRAY[gen_random_uuid()])",
            &[&q],
        )
        .expect_err("ack on a dropped queue succeeded");
    assert_eq!(error.code(), Some(&SqlState::UNDEFINED_OBJECT), "{error}");
}

#[test]
fn a_rolled_back_create_leaves_nothing_cached() {
    let mut cached = connect_session();
    let q = unique_name("cache_rolled_back");
    let mut tx = cached.transaction().unwrap();
    tx.execute("SELECT bussig.create_queue($1::text)", &[&q])
        .unwrap();
    send(&mut tx, &q, &json!({ "rolled": "back" }));
    tx.rollback().unwrap();

    let error = cached
        .query_one("SELECT bussig.send($1::text, '{}')", &[&q])
        .expect_err("send to a queue whose creation rolled back succeeded");
    assert_eq!(error.code(), Some(&SqlState::UNDEFINED_OBJECT), "{error}");
}

#[test]
fn a_notify_turned_on_elsewhere_reaches_a_backend_that_sent_before() {
    let mut cached = connect_session();
    let mut other = connect();
    let queue = Queue::create(&mut other, "cache_notify", "");
    let q = queue.name.as_str();
    send(&mut cached, q, &json!({ "before": "notify" }));

    let channel = format!("bussig_{q}");
    let mut listener = connect_session();
    listener
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .unwrap();
    other
        .execute("SELECT bussig.alter_queue($1::text, notify => true)", &[&q])
        .unwrap();
    send(&mut cached, q, &json!({ "after": "notify" }));

    let mut notifications = listener.session().notifications();
    let note = notifications
        .timeout_iter(Duration::from_secs(10))
        .next()
        .expect("notification stream")
        .expect("no notification within 10 s of a send to a queue that asked for one");
    assert_eq!(note.channel(), channel);
}
