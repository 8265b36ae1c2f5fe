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

/// Sends write the message table directly, from a description of it each backend keeps (see
/// `src/pg/direct_insert.rs`). A trigger, an index or a new extension made by another connection must
/// reach a backend that sent before, at its next send.
#[test]
fn a_change_to_the_message_table_elsewhere_reaches_a_backend_that_sent_before() {
    let database = Database::create("cache_message_table");
    let mut admin = database.connect();
    admin
        .batch_execute(
            "CREATE EXTENSION bussig; CREATE EXTENSION amcheck; SELECT bussig.create_queue('q');",
        )
        .unwrap();
    let mut cached = database.connect();
    send(&mut cached, "q", &json!({ "k": "before" }));

    admin
        .batch_execute(
            "CREATE TABLE seen (message_id bigint);
             CREATE FUNCTION public.note() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN INSERT INTO public.seen VALUES (NEW.message_id); RETURN NULL; END $$;
             CREATE TRIGGER note AFTER INSERT ON bussig.message FOR EACH ROW EXECUTE FUNCTION public.note();",
        )
        .unwrap();
    let noted = send(&mut cached, "q", &json!({ "k": "noted" }));
    let seen: Vec<i64> = admin
        .query("SELECT message_id FROM seen", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(seen, vec![noted]);

    admin
        .batch_execute(
            "DROP TRIGGER note ON bussig.message;
             CREATE INDEX message_k ON bussig.message ((payload->>'k')) WHERE priority = 0;",
        )
        .unwrap();
    send(&mut cached, "q", &json!({ "k": "indexed" }));
    send_batch(
        &mut cached,
        "q",
        &[json!({ "k": "batch" }), json!({ "k": "batch" })],
    );
    admin
        .batch_execute("SELECT bt_index_check('bussig.message_k', true)")
        .unwrap();
    // Found through the new index, which checked complete above.
    admin.batch_execute("SET enable_seqscan = off").unwrap();
    let found: i64 = admin
        .query_one(
            "SELECT count(*) FROM bussig.message WHERE payload->>'k' IN ('indexed', 'batch') AND priority = 0",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(found, 3);

    // A new extension: new table, new indexes, new sequence, none of them under the old OIDs.
    admin
        .batch_execute(
            "DROP EXTENSION bussig CASCADE; CREATE EXTENSION bussig; SELECT bussig.create_queue('q');",
        )
        .unwrap();
    let id = send(&mut cached, "q", &json!({ "k": "new extension" }));
    let delivered = read(&mut admin, "q", 10, None);
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0].id, id);
    admin
        .batch_execute(
            "SELECT bt_index_check(indexrelid, true) FROM pg_index WHERE indrelid = 'bussig.message'::regclass",
        )
        .unwrap();
}
