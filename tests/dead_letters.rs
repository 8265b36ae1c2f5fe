//! Messages that keep failing, or are rejected, land in `<queue>_dlq` with
//! their content intact and a reason; redrive brings them back.

use uuid::Uuid;

use bussig_tests::*;

const DEAD_LETTER_HEADERS: [&str; 3] = [
    "bussig-dead-letter-reason",
    "bussig-dead-letter-error",
    "bussig-source-queue",
];

#[test]
fn dead_letters() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "dead_letters", "max_deliveries => 3");
    let (q, dlq) = (queue.name.as_str(), queue.dlq());
    let dlq_of_q: String = client
        .query_one(
            "SELECT dead_letter_queue FROM bussig.queues WHERE queue = $1::text",
            &[&q],
        )
        .unwrap()
        .get(0);
    assert_eq!(dlq_of_q, dlq);

    // Three failed deliveries exhaust max_deliveries 3.
    let payload = json!({ "order": 42 });
    let id: i64 = client
        .query_one(
            "SELECT bussig.send($1::text, $2::jsonb, headers => $3::jsonb, \
                    correlation_id => 'corr-1', reply_to => 'replies')",
            &[&q, &payload, &json!({ "trace": "t-1" })],
        )
        .unwrap()
        .get(0);
    for attempt in 1..=3 {
        let d = read_one(&mut client, q).expect("message is ready again after nack");
        assert_eq!((d.id, d.delivery_count), (id, attempt));
        let error = (attempt == 3).then_some("boom");
        assert!(
            nack(&mut client, q, id, d.token, error),
            "nack {attempt} failed"
        );
    }
    assert!(
        read_one(&mut client, q).is_none(),
        "delivered more than max_deliveries times"
    );
    assert!(peek(&mut client, q).is_empty());

    let dead = peek(&mut client, &dlq);
    assert_eq!(dead.len(), 1, "exhausted message is not in {dlq}");
    let dead = &dead[0];
    assert_eq!(dead.payload, payload);
    assert_eq!(dead.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(dead.reply_to.as_deref(), Some("replies"));
    assert_eq!(header(&dead.headers, "trace"), Some("t-1"));
    assert_eq!(
        header(&dead.headers, "bussig-dead-letter-reason"),
        Some("max_deliveries")
    );
    assert_eq!(
        header(&dead.headers, "bussig-dead-letter-error"),
        Some("boom")
    );
    assert_eq!(header(&dead.headers, "bussig-source-queue"), Some(q));

    // Redrive: back in the queue, fresh count, no dead-letter headers.
    let moved: i64 = client
        .query_one("SELECT bussig.redrive($1::text)", &[&q])
        .unwrap()
        .get(0);
    assert_eq!(moved, 1);
    assert!(
        peek(&mut client, &dlq).is_empty(),
        "redrive left the message in {dlq}"
    );
    let back = read_one(&mut client, q).expect("redriven message is readable");
    assert_eq!((&back.payload, back.delivery_count), (&payload, 1));
    assert_eq!(back.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(back.reply_to.as_deref(), Some("replies"));
    assert_eq!(header(&back.headers, "trace"), Some("t-1"));
    for key in DEAD_LETTER_HEADERS {
        assert_eq!(
            header(&back.headers, key),
            None,
            "redriven message still has {key}"
        );
    }
    assert!(ack(&mut client, q, back.id, back.token));

    // dead_letter moves a message at once; its reason defaults to 'rejected'.
    let id = send(&mut client, q, &json!({ "bad": true }));
    let d = read_one(&mut client, q).expect("delivery");
    let sql = "SELECT bussig.dead_letter($1::text, $2::bigint, $3::uuid, error => 'bad input')";
    let moved: bool = client.query_one(sql, &[&q, &id, &d.token]).unwrap().get(0);
    assert!(moved, "dead_letter with the current token failed");
    let again: bool = client.query_one(sql, &[&q, &id, &d.token]).unwrap().get(0);
    assert!(
        !again,
        "dead_letter of a message already gone returned true"
    );
    assert!(
        peek(&mut client, q).is_empty(),
        "dead-lettered message still in {q}"
    );
    let dead = peek(&mut client, &dlq);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, json!({ "bad": true }));
    assert_eq!(
        header(&dead[0].headers, "bussig-dead-letter-reason"),
        Some("rejected")
    );
    assert_eq!(
        header(&dead[0].headers, "bussig-dead-letter-error"),
        Some("bad input")
    );
    assert_eq!(header(&dead[0].headers, "bussig-source-queue"), Some(q));

    // drop_queue takes the queue's own dead-letter queue with it.
    let dropped: bool = client
        .query_one("SELECT bussig.drop_queue($1::text)", &[&q])
        .unwrap()
        .get(0);
    assert!(dropped);
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM bussig.queues WHERE queue IN ($1::text, $2::text)",
            &[&q, &dlq],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "drop_queue left {q} or {dlq} behind");
}

/// `bussig.nack(queue, id, token, delay => '0', error => error)`.
fn nack(c: &mut Client, q: &str, id: i64, token: Uuid, error: Option<&str>) -> bool {
    let sql = "SELECT bussig.nack($1::text, $2::bigint, $3::uuid, delay => '0', error => $4::text)";
    c.query_one(sql, &[&q, &id, &token, &error])
        .expect("nack")
        .get(0)
}

/// A waiting read that finds only an expired message dead-letters it and returns at once: sleeping,
/// it held the dead letter's rows (and a capped queue's slot, or a group's row) and hid it from the
/// dead-letter queue until its wait ended.
#[test]
fn a_waiting_read_that_only_dead_letters_returns_at_once() {
    // Without a worker, whose expiry step could dead-letter the message before the read does.
    let (_database, mut client) = Database::without_worker("dead_while_waiting");
    client
        .batch_execute(
            "SELECT bussig.create_queue('q', message_ttl => '100 milliseconds', max_in_flight => 1)",
        )
        .unwrap();
    let id: i64 = client
        .query_one("SELECT bussig.send('q', '1')", &[])
        .unwrap()
        .get(0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let began = std::time::Instant::now();
    let read: i64 = client
        .query_one(
            "SELECT count(*) FROM bussig.read('q', 1, wait => '10 seconds')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(read, 0, "an expired message delivered");
    assert!(
        began.elapsed() < std::time::Duration::from_secs(5),
        "slept {:?} after dead-lettering",
        began.elapsed()
    );
    let dead: i64 = client
        .query_one("SELECT message_id FROM bussig.peek('q_dlq', 1)", &[])
        .unwrap()
        .get(0);
    assert_eq!(dead, id);
}
