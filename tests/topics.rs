//! Publish/subscribe: NATS-style patterns route each published message into
//! every matching queue exactly once, within the publisher's transaction; a
//! fan-out above `bussig.inline_fanout_limit` is delivered by the worker.
//!
//! Every subject here starts with a token unique to the test, so patterns such
//! as `<prefix>.>` never catch what other tests (or other binaries) publish.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use bussig_tests::*;

/// One row of `bussig.read`, with the subject the message was published on.
#[derive(Debug)]
struct Routed {
    subject: Option<String>,
    payload: Value,
    headers: Option<Value>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
}

/// Reads (and locks) up to `max` messages of `queue`, in delivery order.
fn read_routed(c: &mut impl GenericClient, queue: &str, max: i32) -> Vec<Routed> {
    let sql = "SELECT subject, payload, headers, correlation_id, reply_to \
               FROM bussig.read($1::text, $2::int)";
    c.query(sql, &[&queue, &max])
        .unwrap_or_else(|e| panic!("read({queue}): {e}"))
        .iter()
        .map(|r| Routed {
            subject: r.get(0),
            payload: r.get(1),
            headers: r.get(2),
            correlation_id: r.get(3),
            reply_to: r.get(4),
        })
        .collect()
}

fn subscribe(c: &mut impl GenericClient, queue: &str, pattern: &str) -> bool {
    c.query_one(
        "SELECT bussig.subscribe($1::text, $2::text)",
        &[&queue, &pattern],
    )
    .unwrap_or_else(|e| panic!("subscribe({queue}, {pattern}): {e}"))
    .get(0)
}

fn unsubscribe(c: &mut impl GenericClient, queue: &str, pattern: &str) -> bool {
    c.query_one(
        "SELECT bussig.unsubscribe($1::text, $2::text)",
        &[&queue, &pattern],
    )
    .unwrap_or_else(|e| panic!("unsubscribe({queue}, {pattern}): {e}"))
    .get(0)
}

/// `bussig.publish(subject, payload)`: how many queues it reached.
fn publish(c: &mut impl GenericClient, subject: &str, payload: &Value) -> i32 {
    c.query_one(
        "SELECT bussig.publish($1::text, $2::jsonb)",
        &[&subject, payload],
    )
    .unwrap_or_else(|e| panic!("publish({subject}): {e}"))
    .get(0)
}

/// `bussig.match(subject)`, as sorted (queue, pattern) pairs.
fn matches(c: &mut impl GenericClient, subject: &str) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = c
        .query(
            "SELECT queue, pattern FROM bussig.match($1::text)",
            &[&subject],
        )
        .unwrap_or_else(|e| panic!("match({subject}): {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    rows.sort();
    rows
}

fn pairs(rows: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = rows
        .iter()
        .map(|(q, p)| (q.to_string(), p.to_string()))
        .collect();
    rows.sort();
    rows
}

/// Runs `sql` and asserts that it fails with `expected`.
fn assert_fails(c: &mut Client, expected: &SqlState, sql: &str, params: &[&dyn Param]) {
    match c.query(sql, params) {
        Ok(rows) => panic!(
            "{sql} {params:?} succeeded ({} rows), expected {}",
            rows.len(),
            expected.code()
        ),
        Err(e) => assert_eq!(e.code(), Some(expected), "{sql} {params:?}: {e}"),
    }
}

#[test]
fn fan_out_with_overlapping_patterns() {
    let mut client = connect();
    let p = unique_name("topics");
    let qa = Queue::create(&mut client, "topics_a", "");
    let qb = Queue::create(&mut client, "topics_b", "");
    let qc = Queue::create(&mut client, "topics_c", "");
    let qd = Queue::create(&mut client, "topics_d", "");
    let (a, b, c, d) = (
        qa.name.as_str(),
        qb.name.as_str(),
        qc.name.as_str(),
        qd.name.as_str(),
    );
    let orders_star = format!("{p}.orders.*");
    let orders_tail = format!("{p}.orders.>");
    let eu_star = format!("{p}.orders.eu.*");
    let all = format!("{p}.>");
    let invoices = format!("{p}.invoices.>");

    assert!(subscribe(&mut client, a, &orders_star), "new subscription");
    assert!(
        !subscribe(&mut client, a, &orders_star),
        "a repeated subscription must report false"
    );
    assert!(subscribe(&mut client, a, &orders_tail));
    assert!(subscribe(&mut client, b, &eu_star));
    assert!(subscribe(&mut client, c, &all));
    assert!(subscribe(&mut client, d, &invoices));

    // The subscriptions view lists each (queue, pattern) once, none expiring.
    let names = vec![a.to_string(), b.to_string(), c.to_string(), d.to_string()];
    let listed: Vec<(String, String, bool)> = client
        .query(
            "SELECT queue, pattern, expires_at IS NULL FROM bussig.subscriptions \
             WHERE queue = ANY($1) ORDER BY queue, pattern",
            &[&names],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut expected: Vec<(String, String, bool)> = [
        (a, &orders_star),
        (a, &orders_tail),
        (b, &eu_star),
        (c, &all),
        (d, &invoices),
    ]
    .iter()
    .map(|(q, pat)| (q.to_string(), pat.to_string(), true))
    .collect();
    expected.sort();
    assert_eq!(listed, expected, "bussig.subscriptions");

    // match: every (queue, pattern) that matches, both of A's when both do.
    let eu = format!("{p}.orders.eu");
    let created = format!("{p}.orders.eu.created");
    let invoice = format!("{p}.invoices.x");
    assert_eq!(
        matches(&mut client, &eu),
        pairs(&[(a, &orders_star), (a, &orders_tail), (c, &all)]),
        "match({eu})"
    );
    assert_eq!(
        matches(&mut client, &created),
        pairs(&[(a, &orders_tail), (b, &eu_star), (c, &all)]),
        "match({created})"
    );
    assert_eq!(
        matches(&mut client, &invoice),
        pairs(&[(c, &all), (d, &invoices)]),
        "match({invoice})"
    );
    // `>` takes one or more tokens: only C's `<p>.>` matches `<p>.orders`.
    assert_eq!(
        matches(&mut client, &format!("{p}.orders")),
        pairs(&[(c, &all)])
    );
    assert_eq!(
        matches(&mut client, &p),
        vec![],
        "`<p>.>` must not match `<p>`"
    );

    // Publish: A gets one copy of orders.eu although two of its patterns match.
    let headers = json!({ "tenant": "acme", "n": 1 });
    let reached: i32 = client
        .query_one(
            "SELECT bussig.publish($1::text, $2::jsonb, headers => $3::jsonb, \
             correlation_id => 'corr-1', reply_to => 'replies')",
            &[&eu, &json!({ "event": "eu" }), &headers],
        )
        .unwrap()
        .get(0);
    assert_eq!(reached, 2, "publish({eu}) reaches A and C");
    assert_eq!(
        publish(&mut client, &created, &json!({ "event": "created" })),
        3,
        "publish({created}) reaches A, B and C"
    );
    assert_eq!(
        publish(&mut client, &invoice, &json!({ "event": "invoice" })),
        2,
        "publish({invoice}) reaches C and D"
    );

    let events = |rows: &[Routed]| -> Vec<(String, Value)> {
        rows.iter()
            .map(|r| {
                (
                    r.subject.clone().expect("subject column"),
                    r.payload.clone(),
                )
            })
            .collect()
    };
    let got_a = read_routed(&mut client, a, 10);
    assert_eq!(
        events(&got_a),
        vec![
            (eu.clone(), json!({ "event": "eu" })),
            (created.clone(), json!({ "event": "created" })),
        ],
        "queue A"
    );
    let got_b = read_routed(&mut client, b, 10);
    assert_eq!(
        events(&got_b),
        vec![(created.clone(), json!({ "event": "created" }))],
        "queue B"
    );
    let got_c = read_routed(&mut client, c, 10);
    assert_eq!(
        events(&got_c),
        vec![
            (eu.clone(), json!({ "event": "eu" })),
            (created.clone(), json!({ "event": "created" })),
            (invoice.clone(), json!({ "event": "invoice" })),
        ],
        "queue C"
    );
    let got_d = read_routed(&mut client, d, 10);
    assert_eq!(
        events(&got_d),
        vec![(invoice.clone(), json!({ "event": "invoice" }))],
        "queue D"
    );

    // Headers, correlation id and reply-to travel with every copy.
    for copy in [&got_a[0], &got_c[0]] {
        assert_eq!(copy.headers.as_ref(), Some(&headers), "headers of {copy:?}");
        assert_eq!(copy.correlation_id.as_deref(), Some("corr-1"));
        assert_eq!(copy.reply_to.as_deref(), Some("replies"));
    }
    for copy in [&got_a[1], &got_b[0], &got_c[2], &got_d[0]] {
        assert_eq!(copy.headers, None, "headers of {copy:?}");
        assert_eq!(copy.correlation_id, None);
        assert_eq!(copy.reply_to, None);
    }

    // Nothing else arrived: everything delivered is now locked, nothing ready.
    for (q, n) in [(a, 2), (b, 1), (c, 3), (d, 1)] {
        assert_eq!(counts(&mut client, q), (0, 0, n), "counts of {q}");
    }

    // publish_batch routes each element by its own subject: 2 + 2 copies.
    let batch: i64 = client
        .query_one(
            "SELECT bussig.publish_batch($1::text[], $2::jsonb[])",
            &[
                &vec![eu.clone(), invoice.clone()],
                &vec![json!({ "batch": 1 }), json!({ "batch": 2 })],
            ],
        )
        .unwrap()
        .get(0);
    assert_eq!(batch, 4, "publish_batch copies");
    assert_eq!(
        events(&read_routed(&mut client, a, 10)),
        vec![(eu.clone(), json!({ "batch": 1 }))]
    );
    assert!(read_routed(&mut client, b, 10).is_empty());
    assert_eq!(
        events(&read_routed(&mut client, c, 10)),
        vec![
            (eu.clone(), json!({ "batch": 1 })),
            (invoice.clone(), json!({ "batch": 2 })),
        ]
    );
    assert_eq!(
        events(&read_routed(&mut client, d, 10)),
        vec![(invoice.clone(), json!({ "batch": 2 }))]
    );
}

#[test]
fn rolled_back_publish_delivers_nothing() {
    let mut client = connect();
    let p = unique_name("topics_rb");
    let qa = Queue::create(&mut client, "topics_rb_a", "");
    let qb = Queue::create(&mut client, "topics_rb_b", "");
    let subject = format!("{p}.event");
    assert!(subscribe(&mut client, &qa.name, &subject));
    assert!(subscribe(&mut client, &qb.name, &format!("{p}.*")));

    let mut tx = client.transaction().unwrap();
    assert_eq!(publish(&mut tx, &subject, &json!({ "rolled": "back" })), 2);
    tx.rollback().unwrap();

    for q in [&qa.name, &qb.name] {
        assert!(
            read_routed(&mut client, q, 10).is_empty(),
            "rolled-back publish delivered to {q}"
        );
        assert_eq!(counts(&mut client, q), (0, 0, 0), "counts of {q}");
    }

    // The same publish committed is delivered: the rollback was the only difference.
    let mut tx = client.transaction().unwrap();
    assert_eq!(publish(&mut tx, &subject, &json!({ "committed": true })), 2);
    tx.commit().unwrap();
    for q in [&qa.name, &qb.name] {
        let got = read_routed(&mut client, q, 10);
        assert_eq!(got.len(), 1, "{q}: {got:?}");
        assert_eq!(got[0].payload, json!({ "committed": true }));
    }
}

#[test]
fn unsubscribe_stops_routing() {
    let mut client = connect();
    let mut other = connect();
    let p = unique_name("topics_unsub");
    let queue = Queue::create(&mut client, "topics_unsub", "");
    let q = queue.name.as_str();
    let exact = format!("{p}.a");
    let star = format!("{p}.*");
    assert!(subscribe(&mut client, q, &exact));
    assert!(subscribe(&mut client, q, &star));

    // Two matching patterns, one copy. `other` publishes, so its routing
    // cache is warm before the unsubscriptions below.
    assert_eq!(publish(&mut other, &exact, &json!({ "n": 1 })), 1);

    assert!(unsubscribe(&mut client, q, &exact), "existing subscription");
    assert!(
        !unsubscribe(&mut client, q, &exact),
        "a second unsubscribe must report false"
    );
    assert_eq!(
        publish(&mut other, &exact, &json!({ "n": 2 })),
        1,
        "still routed through {star}"
    );
    assert_eq!(matches(&mut other, &exact), pairs(&[(q, &star)]));

    assert!(unsubscribe(&mut client, q, &star));
    assert_eq!(
        publish(&mut other, &exact, &json!({ "n": 3 })),
        0,
        "routed after the last unsubscribe"
    );
    assert_eq!(matches(&mut other, &exact), vec![]);
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM bussig.subscriptions WHERE queue = $1",
            &[&q],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "subscriptions left after unsubscribing");

    let got: Vec<Value> = read_routed(&mut client, q, 10)
        .into_iter()
        .map(|r| r.payload)
        .collect();
    assert_eq!(got, vec![json!({ "n": 1 }), json!({ "n": 2 })]);
}

#[test]
fn publish_without_subscriber_returns_zero() {
    let mut client = connect();
    let subject = format!("{}.nobody.listens", unique_name("topics_none"));
    assert_eq!(publish(&mut client, &subject, &json!({ "lost": true })), 0);
    assert_eq!(matches(&mut client, &subject), vec![]);
    let batch: i64 = client
        .query_one(
            "SELECT bussig.publish_batch(ARRAY[$1::text], ARRAY['{}'::jsonb])",
            &[&subject],
        )
        .unwrap()
        .get(0);
    assert_eq!(batch, 0);
}

#[test]
fn invalid_subjects_and_patterns() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "topics_invalid", "");
    let q = queue.name.as_str();
    let c = &mut client;
    let bad = &SqlState::INVALID_PARAMETER_VALUE;

    let long = vec!["a"; 17].join(".");
    let bad_subjects = ["", "a..b", ".a", "a.", "a.*", "a.>", "a b", "a*", &long];
    for subject in bad_subjects {
        assert_fails(c, bad, "SELECT bussig.publish($1::text, '{}')", &[&subject]);
        assert_fails(
            c,
            bad,
            "SELECT bussig.publish_batch(ARRAY[$1::text], ARRAY['{}'::jsonb])",
            &[&subject],
        );
        assert_fails(c, bad, "SELECT * FROM bussig.match($1::text)", &[&subject]);
    }
    let bad_patterns = ["", "a..b", "a.>.b", ">.a", "a*", "a.b>", "a .b", &long];
    for pattern in bad_patterns {
        assert_fails(
            c,
            bad,
            "SELECT bussig.subscribe($1::text, $2::text)",
            &[&q, &pattern],
        );
        assert_fails(
            c,
            bad,
            "SELECT bussig.unsubscribe($1::text, $2::text)",
            &[&q, &pattern],
        );
    }
    // Nothing was subscribed along the way.
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM bussig.subscriptions WHERE queue = $1",
            &[&q],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[test]
fn large_fan_out_is_delivered_by_the_worker() {
    const QUEUES: usize = 60;
    const MESSAGES: i64 = 20;
    let mut client = connect();
    let limit: String = client
        .query_one("SHOW bussig.inline_fanout_limit", &[])
        .unwrap()
        .get(0);
    let limit: usize = limit.parse().expect("inline_fanout_limit is a number");
    assert!(
        QUEUES > limit,
        "{QUEUES} queues must exceed bussig.inline_fanout_limit ({limit})"
    );

    let subject = format!("{}.big", unique_name("topics_big"));
    let queues: Vec<Queue> = (0..QUEUES)
        .map(|_| Queue::create(&mut client, "topics_big", ""))
        .collect();
    let names: Vec<String> = queues.iter().map(|q| q.name.clone()).collect();
    for q in &names {
        assert!(subscribe(&mut client, q, &subject));
    }

    // A rolled-back large publish must never be delivered by the worker.
    let mut tx = client.transaction().unwrap();
    assert_eq!(
        publish(&mut tx, &subject, &json!({ "rolled": "back" })),
        QUEUES as i32
    );
    tx.rollback().unwrap();

    let mut tx = client.transaction().unwrap();
    for n in 0..MESSAGES {
        assert_eq!(
            publish(&mut tx, &subject, &json!({ "n": n })),
            QUEUES as i32,
            "publish {n} reaches every queue"
        );
    }
    tx.commit().unwrap();

    // The worker delivers after the commit: poll until every queue has them all.
    let sql = "SELECT queue, ready::bigint FROM bussig.queues WHERE queue = ANY($1)";
    eventually(
        Duration::from_secs(30),
        "the worker to deliver the fan-out to every queue",
        || {
            let ready: BTreeMap<String, i64> = client
                .query(sql, &[&names])
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            assert_eq!(ready.len(), QUEUES, "a queue vanished: {ready:?}");
            for (q, n) in &ready {
                assert!(
                    *n <= MESSAGES,
                    "{q} holds {n} messages, more than {MESSAGES}"
                );
            }
            ready.values().all(|n| *n == MESSAGES).then_some(())
        },
    );

    // Each queue holds each message exactly once, with its subject, and never
    // the rolled-back one.
    let expected: Vec<Value> = (0..MESSAGES).map(|n| json!({ "n": n })).collect();
    for q in &names {
        let got = read_routed(&mut client, q, 100);
        assert!(
            got.iter()
                .all(|r| r.subject.as_deref() == Some(subject.as_str())),
            "{q}: wrong subject in {got:?}"
        );
        let mut payloads: Vec<Value> = got.into_iter().map(|r| r.payload).collect();
        payloads.sort_by_key(|v| v["n"].as_i64());
        assert_eq!(payloads, expected, "messages of {q}");
    }
}
