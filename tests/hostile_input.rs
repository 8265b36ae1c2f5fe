//! Wrong and hostile input, as a client sends it: every call either does what the README documents or
//! fails with the documented SQLSTATE, and a call that fails leaves nothing behind.

use std::cell::RefCell;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

use bussig_tests::*;

/// What a statement did: Ok, or the SQLSTATE it failed with.
fn outcome(c: &mut Client, sql: &str, params: &[&dyn Param]) -> Result<(), String> {
    match c.query(sql, params) {
        Ok(_) => Ok(()),
        Err(e) => Err(e
            .code()
            .map(|code| code.code().to_string())
            .unwrap_or_else(|| format!("client error: {e}"))),
    }
}

/// Everything a failed call could have half-written, counted.
fn footprint(c: &mut Client) -> Vec<i64> {
    let sql = "SELECT (SELECT count(*) FROM bussig.queue), (SELECT count(*) FROM bussig.message),
                      (SELECT count(*) FROM bussig.dedup), (SELECT count(*) FROM bussig.subscription),
                      (SELECT count(*) FROM bussig.body), (SELECT count(*) FROM bussig.queue_grant)";
    let row = c.query_one(sql, &[]).expect(sql);
    (0..6).map(|i| row.get(i)).collect()
}

/// Runs `sql` and checks its outcome against `expected`. A call expected to fail runs on its own and
/// must leave no trace; one expected to succeed is rolled back, so that every case starts alike.
fn check(c: &mut Client, expected: Result<(), &str>, sql: &str, params: &[&dyn Param]) {
    let got = if expected.is_ok() {
        c.batch_execute("BEGIN").unwrap();
        let got = outcome(c, sql, params);
        c.batch_execute("ROLLBACK").unwrap();
        got
    } else {
        let before = footprint(c);
        let got = outcome(c, sql, params);
        if got.is_err() {
            assert_eq!(
                footprint(c),
                before,
                "{sql} with {params:?} failed but changed something"
            );
        }
        got
    };
    assert_eq!(
        got.as_ref().map_err(|e| e.as_str()).copied(),
        expected,
        "{sql} with {params:?}"
    );
}

/// A database of the test's own with the extension, so that the footprint is the test's alone.
/// `setting` (e.g. "bussig.max_message_size = '2kB'") is the database's, set before anyone connects,
/// so that it holds behind a transaction-pooling proxy too.
fn own_database(test: &str, setting: Option<&str>) -> (Database, Client) {
    let database = Database::create(test);
    if let Some(setting) = setting {
        let sql = format!("ALTER DATABASE \"{}\" SET {setting}", database.name);
        connect().batch_execute(&sql).expect(&sql);
    }
    let mut client = database.connect();
    client
        .batch_execute("CREATE EXTENSION bussig")
        .expect("create extension");
    (database, client)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// The stream the samples name.
const HOSTILE_STREAM: &str = "hostile_stream";

/// A sample value for every argument name the API uses, valid on its own.
fn sample(name: &str, queue: &str, other_queue: &str) -> String {
    let quoted = |text: &str| format!("'{text}'");
    match name {
        "queue" => quoted(queue),
        "dead_letter_queue" => quoted(other_queue),
        "payload" => "'{\"k\": 1}'::jsonb".into(),
        "payloads" => "ARRAY['{\"k\": 1}']::jsonb[]".into(),
        "headers" => "'{\"h\": \"v\"}'::jsonb".into(),
        "delay" => "'0'::interval".into(),
        "priority" => "0".into(),
        "dedup_id" => "gen_random_uuid()::text".into(),
        "correlation_id" | "reply_to" | "error" | "reason" | "group_id" => quoted("x"),
        "group_ids" => "ARRAY['x']".into(),
        "max_messages" => "1".into(),
        "lock_timeout" => "'30 seconds'::interval".into(),
        "wait" => "'0'::interval".into(),
        "message_id" => "1".into(),
        "lock_token" | "lease_token" => "gen_random_uuid()".into(),
        "message_ids" => "ARRAY[1]::bigint[]".into(),
        "lock_tokens" => "ARRAY[gen_random_uuid()]".into(),
        "subject" => quoted("hostile.null"),
        "subjects" => "ARRAY['hostile.null']".into(),
        "pattern" => quoted("hostile.*"),
        "ttl" => "'1 hour'::interval".into(),
        "role" => "current_user::text".into(),
        "privileges" => "ARRAY['send']".into(),
        "max_deliveries" => "5".into(),
        "message_ttl" | "dedup_window" | "retry_delay_max" => "'1 hour'::interval".into(),
        "retry_delay" => "'1 second'::interval".into(),
        "retry_multiplier" => "2".into(),
        "notify" => "false".into(),
        "max_in_flight" => "2".into(),
        // Streams: `null_in_every_argument` makes stream HOSTILE_STREAM with group 'g'.
        "stream" => quoted(HOSTILE_STREAM),
        "consumer_group" => quoted("g"),
        "partitions" | "max_records" | "seq" | "from_seq" => "1".into(),
        "partition" => "0".into(),
        "retention" => "'1 day'::interval".into(),
        "retention_bytes" => "1000000".into(),
        "key" => quoted("k"),
        "keys" => "ARRAY['k']".into(),
        "start_at" => quoted("earliest"),
        "lease" => "'30 seconds'::interval".into(),
        "at" => "now()".into(),
        other => panic!("no sample value for argument {other}: add one"),
    }
}

/// Every public function with every argument NULL in turn (the others valid): an argument whose
/// default is NULL accepts NULL (it means "not given"); any other raises 22004, changing nothing.
#[test]
fn null_in_every_argument() {
    let (_database, mut c) = own_database("null_args", None);
    let queue = Queue::create(&mut c, "null_args", "");
    let other = Queue::create(&mut c, "null_args_other", "");
    c.execute("SELECT bussig.create_stream($1::text)", &[&HOSTILE_STREAM])
        .unwrap();
    c.execute(
        "SELECT bussig.create_consumer_group($1::text, 'g')",
        &[&HOSTILE_STREAM],
    )
    .unwrap();
    let functions = c
        .query(
            "SELECT p.proname::text, (p.proargnames::text[])[1:p.pronargs], p.pronargs::int, p.pronargdefaults::int,
                    coalesce(string_to_array(pg_get_expr(p.proargdefaults, 0), ', '), '{}')
             FROM pg_proc p
             WHERE p.pronamespace = 'bussig'::regnamespace AND p.prokind = 'f' AND p.pronargs > 0
               AND p.prorettype <> 'trigger'::regtype
               -- superseded and the *_privilege_of: bussig's own statements' helpers, not granted to PUBLIC
               AND p.proname NOT IN ('has_queue_privilege', 'may_create_queues', 'retry_backoff', 'superseded',
                                     'has_stream_privilege', 'stream_storage', 'group_lease_until',
                                     'stream_body_referenced', 'queue_privilege_of', 'stream_privilege_of')
             ORDER BY 1",
            &[],
        )
        .expect("list functions");
    assert!(
        functions.len() >= 20,
        "found only {} functions",
        functions.len()
    );
    for function in functions {
        let name: String = function.get(0);
        let args: Vec<String> = function.get(1);
        let count: i32 = function.get(2);
        let defaults: Vec<String> = function.get(4);
        let first_default = count as usize - defaults.len();
        for null_at in 0..args.len() {
            let call: Vec<String> = args
                .iter()
                .enumerate()
                .map(|(i, arg)| {
                    let value = if i == null_at {
                        "NULL".to_string()
                    } else {
                        sample(arg, &queue.name, &other.name)
                    };
                    format!("{arg} => {value}")
                })
                .collect();
            let sql = format!("SELECT * FROM bussig.\"{name}\"({})", call.join(", "));
            let default_is_null =
                null_at >= first_default && defaults[null_at - first_default].starts_with("NULL");
            // ack_and_read settles a batch only when both arrays are given, and says so when one is missing.
            let pair_half = name == "ack_and_read"
                && matches!(args[null_at].as_str(), "message_ids" | "lock_tokens");
            let expected = if default_is_null && !pair_half {
                Ok(())
            } else {
                Err("22004")
            };
            check(&mut c, expected, &sql, &[]);
        }
    }
}

/// The documented rule for queue names.
fn valid_queue_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(first) if first.is_ascii_alphanumeric())
        && name.len() <= 60
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[test]
fn queue_names_are_checked_before_anything_is_written() {
    let (_database, client) = own_database("hostile", None);
    let cell = RefCell::new(client);
    let names = prop_oneof![
        "[A-Za-z0-9][A-Za-z0-9_.-]{0,70}",
        "\\PC{0,70}",
        Just("q'; DROP TABLE bussig.message; --".to_string()),
        Just("\"quoted\"".to_string()),
        Just("ünïcödé".to_string()),
        Just(String::new()),
    ];
    runner(200)
        .run(&names, |name| {
            let mut c = cell.borrow_mut();
            let c = &mut *c;
            // Over 56 characters, its dead-letter queue <name>_dlq would be longer than 60.
            let expected = if valid_queue_name(&name) && name.len() <= 56 {
                Ok(())
            } else {
                Err("22023")
            };
            check(
                c,
                expected,
                "SELECT bussig.create_queue($1::text)",
                &[&name],
            );
            // A name that is no queue: every queue function says so, or that the name is invalid.
            let unknown = if valid_queue_name(&name) {
                "42704"
            } else {
                "22023"
            };
            check(
                c,
                Err(unknown),
                "SELECT bussig.send($1::text, '{}')",
                &[&name],
            );
            check(
                c,
                Err(unknown),
                "SELECT * FROM bussig.read($1::text)",
                &[&name],
            );
            check(
                c,
                Err(unknown),
                "SELECT bussig.purge_queue($1::text)",
                &[&name],
            );
            Ok(())
        })
        .unwrap();
}

/// The documented rules for subjects and patterns.
fn valid_subject(text: &str, pattern: bool) -> bool {
    let tokens: Vec<&str> = text.split('.').collect();
    !text.is_empty()
        && text.len() <= 255
        && tokens.len() <= 16
        && tokens.iter().enumerate().all(|(i, token)| {
            let wildcard = pattern && (*token == "*" || (*token == ">" && i == tokens.len() - 1));
            !token.is_empty()
                && token.chars().all(|c| c.is_ascii_graphic())
                && (wildcard || !token.contains(['*', '>']))
        })
}

#[test]
fn subjects_and_patterns_follow_the_nats_rules() {
    let (_database, client) = own_database("hostile", None);
    let cell = RefCell::new(client);
    let queue = Queue::create(&mut cell.borrow_mut(), "hostile_subjects", "");
    let texts = prop_oneof![
        "[a-z*>]{1,3}(\\.[a-z*>]{1,3}){0,17}",
        "[!-~]{0,20}",
        "\\PC{0,20}",
        "[a-z]{1,30}(\\.[a-z]{1,30}){0,12}",
        Just(">".to_string()),
        Just("a..b".to_string()),
        Just("a. b".to_string()),
    ];
    runner(300)
        .run(&texts, |text| {
            let mut c = cell.borrow_mut();
            let c = &mut *c;
            let subject = if valid_subject(&text, false) {
                Ok(())
            } else {
                Err("22023")
            };
            check(
                c,
                subject,
                "SELECT bussig.publish($1::text, '{}')",
                &[&text],
            );
            check(c, subject, "SELECT * FROM bussig.match($1::text)", &[&text]);
            let pattern = if valid_subject(&text, true) {
                Ok(())
            } else {
                Err("22023")
            };
            check(
                c,
                pattern,
                "SELECT bussig.subscribe($1::text, $2::text)",
                &[&queue.name, &text],
            );
            Ok(())
        })
        .unwrap();
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,10}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("\\PC{0,6}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

#[test]
fn headers_must_be_objects_and_messages_fit_the_size_limit() {
    let limit = 2048;
    let setting = format!("bussig.max_message_size = '{limit}B'");
    let (_database, client) = own_database("hostile", Some(&setting));
    let cell = RefCell::new(client);
    let queue = Queue::create(&mut cell.borrow_mut(), "hostile_sizes", "");
    let cases = (json_value(), prop::option::of(json_value()), 0usize..3000);
    runner(200)
        .run(&cases, |(payload, headers, padding)| {
            let mut c = cell.borrow_mut();
            let c = &mut *c;
            let payload = serde_json::json!({"p": payload, "pad": "x".repeat(padding)});
            let sizes = c
                .query_one(
                    "SELECT pg_column_size($1::jsonb)::int, coalesce(pg_column_size($2::jsonb), 0)::int",
                    &[&payload, &headers],
                )
                .unwrap();
            let size = sizes.get::<_, i32>(0) + sizes.get::<_, i32>(1);
            let expected = match &headers {
                Some(h) if !h.is_object() => Err("22023"),
                _ if size > limit => Err("54000"),
                _ => Ok(()),
            };
            check(
                c,
                expected,
                "SELECT bussig.send($1::text, $2::jsonb, headers => $3::jsonb)",
                &[&queue.name, &payload, &headers],
            );
            Ok(())
        })
        .unwrap();
    cell.borrow_mut()
        .execute("SELECT bussig.purge_queue($1::text)", &[&queue.name])
        .unwrap();
}

#[test]
fn deeply_nested_json_is_stored_or_refused_cleanly() {
    let (_database, mut c) = own_database("nesting", None);
    let queue = Queue::create(&mut c, "hostile_nesting", "");
    for depth in [100, 1_000, 10_000, 100_000] {
        let payload = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let before = footprint(&mut c);
        match outcome(
            &mut c,
            "SELECT bussig.send($1::text, $2::text::jsonb)",
            &[&queue.name, &payload],
        ) {
            Ok(()) => {
                let stored: String = c
                    .query_one(
                        "SELECT payload::text FROM bussig.peek($1::text, 1)",
                        &[&queue.name],
                    )
                    .unwrap()
                    .get(0);
                assert_eq!(
                    stored.len(),
                    payload.len(),
                    "depth {depth} stored differently"
                );
                c.execute("SELECT bussig.purge_queue($1::text)", &[&queue.name])
                    .unwrap();
            }
            // PostgreSQL's own parser refuses what would overrun its stack.
            Err(code) => {
                assert_eq!(code, "54001", "depth {depth}");
                assert_eq!(footprint(&mut c), before);
            }
        }
    }
}

/// An interval as months, days and microseconds; its size in years as PostgreSQL would count it.
fn interval() -> impl Strategy<Value = (String, f64)> {
    let part = |max: i64| prop_oneof![-max..=max, -10i64..=10, Just(0i64)];
    (part(1_000_000), part(100_000_000), part(i64::MAX / 2)).prop_map(|(months, days, micros)| {
        let years_of =
            |m: i64, d: i64, us: i64| m as f64 / 12.0 + d as f64 / 365.0 + us as f64 / 3.15e13;
        let longest = [
            years_of(months, 0, 0),
            years_of(0, days, 0),
            years_of(0, 0, micros),
        ]
        .into_iter()
        .map(f64::abs)
        .fold(years_of(months, days, micros).abs(), f64::max);
        let sign = years_of(months, days, micros);
        (
            format!("{months} mons {days} days {micros} microseconds"),
            if longest > 1000.0 {
                f64::INFINITY
            } else {
                sign
            },
        )
    })
}

/// Intervals: negative delays and waits, non-positive lock timeouts and anything longer than 1000
/// years raise 22023; everything else is accepted.
#[test]
fn intervals_negative_and_enormous() {
    let (_database, client) = own_database("hostile", None);
    let cell = RefCell::new(client);
    let queue = Queue::create(&mut cell.borrow_mut(), "hostile_intervals", "");
    send(
        &mut *cell.borrow_mut(),
        &queue.name,
        &serde_json::json!({"ready": true}),
    );
    let near_limit = |(_, years): &(String, f64)| years.is_infinite() || years.abs() < 900.0;
    runner(200)
        .run(
            &interval().prop_filter("not at the limit", near_limit),
            |(text, years)| {
                let mut c = cell.borrow_mut();
                let c = &mut *c;
                let too_long = years.is_infinite();
                let not_negative = if too_long || years < 0.0 {
                    Err("22023")
                } else {
                    Ok(())
                };
                let positive = if too_long || years <= 0.0 {
                    Err("22023")
                } else {
                    Ok(())
                };
                check(
                    c,
                    not_negative,
                    "SELECT bussig.send($1::text, '{}', delay => $2::text::interval)",
                    &[&queue.name, &text],
                );
                // A ready message is there, so a valid wait returns at once.
                check(
                    c,
                    not_negative,
                    "SELECT * FROM bussig.read($1::text, wait => $2::text::interval)",
                    &[&queue.name, &text],
                );
                check(
                    c,
                    positive,
                    "SELECT * FROM bussig.read($1::text, lock_timeout => $2::text::interval)",
                    &[&queue.name, &text],
                );
                check(
                    c,
                    positive,
                    "SELECT bussig.alter_queue($1::text, lock_timeout => $2::text::interval)",
                    &[&queue.name, &text],
                );
                check(
                    c,
                    not_negative,
                    "SELECT bussig.alter_queue($1::text, dedup_window => $2::text::interval)",
                    &[&queue.name, &text],
                );
                Ok(())
            },
        )
        .unwrap();
    // The worker's steps still run: no setting can push a timestamp out of PostgreSQL's range.
    cell.borrow_mut()
        .query_one("SELECT bussig.run_maintenance()", &[])
        .expect("maintenance");
}

#[test]
fn counts_and_array_lengths() {
    let (_database, client) = own_database("hostile", None);
    let cell = RefCell::new(client);
    let queue = Queue::create(&mut cell.borrow_mut(), "hostile_counts", "");
    runner(100)
        .run(
            &(any::<i32>(), 0usize..4, 0usize..4),
            |(max, ids, tokens)| {
                let mut c = cell.borrow_mut();
                let c = &mut *c;
                let in_range = if (1..=1000).contains(&max) {
                    Ok(())
                } else {
                    Err("22023")
                };
                check(
                    c,
                    in_range,
                    "SELECT * FROM bussig.read($1::text, $2::int)",
                    &[&queue.name, &max],
                );
                check(
                    c,
                    in_range,
                    "SELECT * FROM bussig.peek($1::text, $2::int)",
                    &[&queue.name, &max],
                );
                let ids: Vec<i64> = (1..=ids as i64).collect();
                let tokens: Vec<uuid::Uuid> = (0..tokens).map(|_| uuid::Uuid::new_v4()).collect();
                let paired = if ids.len() == tokens.len() {
                    Ok(())
                } else {
                    Err("22023")
                };
                check(
                    c,
                    paired,
                    "SELECT bussig.ack_batch($1::text, $2::bigint[], $3::uuid[])",
                    &[&queue.name, &ids, &tokens],
                );
                let subjects: Vec<String> = (0..ids.len()).map(|i| format!("s.{i}")).collect();
                let payloads: Vec<Value> =
                    (0..tokens.len()).map(|i| serde_json::json!(i)).collect();
                check(
                    c,
                    paired,
                    "SELECT bussig.publish_batch($1::text[], $2::jsonb[])",
                    &[&subjects, &payloads],
                );
                Ok(())
            },
        )
        .unwrap();
}
