//! Streams over time and against hostile input: replay from earliest, a seq and a time; retention
//! emptying segments while groups read; names, keys and subjects.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use bussig_tests::*;

#[test]
fn a_group_replays_from_earliest_from_a_seq_and_from_a_time() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "stream_replay", "");
    let name = stream.name.clone();
    let batch = |c: &mut Client, from: i32| {
        c.execute(
            "SELECT bussig.append_batch($1::text, array_agg(to_jsonb(n))) FROM generate_series($2::int, $2::int + 4) n",
            &[&name, &from],
        )
        .unwrap();
    };
    batch(&mut admin, 1);
    thread::sleep(Duration::from_millis(200));
    let between: String = admin
        .query_one("SELECT clock_timestamp()::text", &[])
        .unwrap()
        .get(0);
    thread::sleep(Duration::from_millis(200));
    batch(&mut admin, 6);
    create_group(&mut admin, &name, "g", "latest");
    let mut c = connect();
    assert!(stream_read(&mut c, &name, "g", 100, "0", "30 seconds").is_empty());
    create_group(&mut admin, &name, "replay", "earliest");
    let all = stream_read(&mut c, &name, "replay", 100, "0", "30 seconds");
    assert_eq!(
        all.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert!(commit_all(&mut c, &name, "replay", &all));
    c.execute(
        "SELECT bussig.stream_seek($1::text, 'replay', 0, 7)",
        &[&name],
    )
    .unwrap();
    let from_seq = stream_read(&mut c, &name, "replay", 100, "0", "30 seconds");
    assert_eq!(
        from_seq.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [7, 8, 9, 10]
    );
    c.execute(
        "SELECT bussig.stream_seek_time($1::text, 'g', $2::text::timestamptz)",
        &[&name, &between],
    )
    .unwrap();
    let from_time = stream_read(&mut c, &name, "g", 100, "0", "30 seconds");
    assert_eq!(
        from_time
            .iter()
            .map(|r| r.payload.as_i64().unwrap())
            .collect::<Vec<_>>(),
        [6, 7, 8, 9, 10]
    );
}

#[test]
fn retention_empties_segments_while_groups_read() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "stream_retain", "retention => '1 second'");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "earliest");
    create_group(&mut admin, &name, "idle", "earliest");
    let appending = AtomicBool::new(true);
    let seen: Mutex<Vec<i64>> = Mutex::new(Vec::new());
    thread::scope(|scope| {
        let (name_ref, appending_ref, seen_ref) = (&name, &appending, &seen);
        scope.spawn(move || {
            let mut c = connect();
            loop {
                let finished = !appending_ref.load(Ordering::SeqCst);
                let records =
                    stream_read(&mut c, name_ref, "g", 50, "100 milliseconds", "30 seconds");
                seen_ref
                    .lock()
                    .unwrap()
                    .extend(records.iter().map(|r| r.seq));
                assert!(commit_all(&mut c, name_ref, "g", &records));
                if finished && records.is_empty() {
                    break;
                }
            }
        });
        let mut appender = connect();
        let mut maintenance = connect();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            appender
                .execute(
                    "SELECT bussig.append($1::text, to_jsonb(n)) FROM generate_series(1, 20) n",
                    &[&name],
                )
                .unwrap();
            maintenance
                .execute("SELECT bussig.run_maintenance()", &[])
                .unwrap();
            thread::sleep(Duration::from_millis(100));
        }
        appending.store(false, Ordering::SeqCst);
    });
    // Retention stops here, so that the worker's rounds leave what is checked below as it is.
    admin
        .execute(
            "SELECT bussig.alter_stream($1::text, retention => '1 day')",
            &[&name],
        )
        .unwrap();
    let seen = seen.into_inner().unwrap();
    // The reading group saw every record once, in order, however segments went.
    assert_eq!(seen, (1..=seen.len() as i64).collect::<Vec<_>>());
    let row = admin
        .query_one(
            "SELECT p.first_seq, p.head_seq, c.committed_seq, c.lag
             FROM bussig.stream_partition p JOIN bussig.stream s USING (stream_id)
             JOIN bussig.consumer_groups c ON c.stream = s.name AND c.consumer_group = 'idle'
             WHERE s.name = $1::text",
            &[&name],
        )
        .unwrap();
    let (first, head, idle_at, idle_lag): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(head, seen.len() as i64);
    assert!(first > 1, "no segment was emptied");
    // The idle group is shown at the retention point, and reads from the oldest record kept.
    assert_eq!((idle_at, idle_lag), (first - 1, head - first + 1));
    let mut c = connect();
    let oldest = stream_read(&mut c, &name, "idle", 1, "0", "30 seconds");
    assert_eq!(oldest[0].seq, first);
    let deleted: i64 = admin
        .query_one(
            "SELECT coalesce(sum(n_tup_del), 0)::bigint FROM pg_stat_user_tables
             WHERE schemaname = 'bussig' AND relname LIKE 'stream\\_' || (SELECT stream_id FROM bussig.stream WHERE name = $1::text) || '\\_%'",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(deleted, 0, "records were deleted row by row");
}

/// A member that reads all the time numbers some partition most of the time (more so while a held
/// snapshot slows numbering): retention waits a while for the partition's row instead of skipping
/// the round, or a busy stream would keep every segment.
#[test]
fn retention_empties_a_due_segment_while_a_reader_keeps_numbering() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "stream_busy_retain", "retention => '1 second'");
    let name = stream.name.clone();
    let first_seq = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT p.first_seq FROM bussig.stream_partition p JOIN bussig.stream s USING (stream_id)
             WHERE s.name = $1::text",
            &[&name],
        )
        .unwrap()
        .get(0)
    };
    admin
        .execute("SELECT bussig.append_batch($1::text, array_agg(to_jsonb(n))) FROM generate_series(1, 10) n", &[&name])
        .unwrap();
    // Half the retention later the segment closes, and a retention after that it is due.
    thread::sleep(Duration::from_millis(600));
    admin
        .execute("SELECT bussig.run_maintenance()", &[])
        .unwrap();
    let holding = AtomicBool::new(true);
    thread::scope(|scope| {
        let (name_ref, holding_ref) = (&name, &holding);
        // Holds the partition's row 2.5 s at first, past the segment's due time, then 150 ms at a
        // time with 2 ms between, as a slow member that reads all the time does: a step that only
        // tried the row would seldom find it free.
        scope.spawn(move || {
            let mut c = connect();
            let mut hold = Duration::from_millis(2_500);
            while holding_ref.load(Ordering::SeqCst) {
                let mut t = c.transaction().unwrap();
                t.execute(
                    "SELECT FROM bussig.stream_partition p JOIN bussig.stream s USING (stream_id)
                     WHERE s.name = $1::text FOR UPDATE OF p",
                    &[name_ref],
                )
                .unwrap();
                thread::sleep(hold);
                t.commit().unwrap();
                hold = Duration::from_millis(150);
                thread::sleep(Duration::from_millis(2));
            }
        });
        // Due, and the row held for a while yet: the step gives up waiting, keeps the segment, and
        // fails nothing.
        thread::sleep(Duration::from_millis(1_200));
        let mut maintenance = connect();
        maintenance
            .execute("SELECT bussig.run_maintenance()", &[])
            .unwrap();
        assert_eq!(
            first_seq(&mut maintenance),
            1,
            "emptied with its partition's row held"
        );
        thread::sleep(Duration::from_millis(1_400));
        // Another caller's round (the worker's, a test's beside this one) may hold the stream and
        // empty the segment while this call skips it: the outcome is looked at until a deadline.
        let deadline = Instant::now() + Duration::from_secs(3);
        while first_seq(&mut maintenance) != 11 && Instant::now() < deadline {
            maintenance
                .execute("SELECT bussig.run_maintenance()", &[])
                .unwrap();
            thread::sleep(Duration::from_millis(20));
        }
        holding.store(false, Ordering::SeqCst);
    });
    assert_eq!(first_seq(&mut admin), 11, "the due segment was kept");
}

/// The documented name rule, for streams and consumer groups as for queues.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 60
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn sqlstate(result: Result<Vec<postgres::Row>, postgres::Error>) -> Option<String> {
    result.err().map(|e| {
        e.code()
            .map_or_else(|| e.to_string(), |c| c.code().to_string())
    })
}

#[test]
fn hostile_names_keys_and_subjects_are_refused_cleanly() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "stream_hostile", "partitions => 3");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "earliest");
    let names = prop_oneof![
        "[A-Za-z0-9][A-Za-z0-9_.-]{0,70}",
        "\\PC{0,70}",
        Just("s'; DROP TABLE bussig.stream; --".to_string()),
        Just(String::new()),
    ];
    let cell = std::cell::RefCell::new(admin);
    let mut runner = TestRunner::new(Config {
        cases: 150,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(names.clone(), names, "\\PC{0,300}"),
            |(stream_name, group, key)| {
                let mut c = cell.borrow_mut();
                let c = &mut *c;
                // A stream of that name: made (valid, rolled back) or refused; unknown everywhere else.
                c.batch_execute("BEGIN").unwrap();
                let made =
                    sqlstate(c.query("SELECT bussig.create_stream($1::text)", &[&stream_name]));
                c.batch_execute("ROLLBACK").unwrap();
                let expected = (!valid_name(&stream_name)).then(|| "22023".to_string());
                prop_assert_eq!(made, expected);
                let unknown = if valid_name(&stream_name) {
                    "42704"
                } else {
                    "22023"
                };
                let appended =
                    sqlstate(c.query("SELECT bussig.append($1::text, '1')", &[&stream_name]));
                prop_assert_eq!(appended.as_deref(), Some(unknown));
                // A group name on the real stream.
                let read = sqlstate(c.query(
                    "SELECT * FROM bussig.stream_read($1::text, $2::text)",
                    &[&name, &group],
                ));
                let expected = if !valid_name(&group) {
                    Some("22023")
                } else if group == "g" {
                    None
                } else {
                    Some("42704")
                };
                prop_assert_eq!(read.as_deref(), expected);
                // Any key of 1 to 256 bytes is a key; it always lands in the same partition.
                c.batch_execute("BEGIN").unwrap();
                let partition = c.query(
                    "SELECT bussig.append($1::text, '1', key => $2::text)",
                    &[&name, &key],
                );
                let again = c.query(
                    "SELECT bussig.append($1::text, '1', key => $2::text)",
                    &[&name, &key],
                );
                c.batch_execute("ROLLBACK").unwrap();
                if key.is_empty() || key.len() > 256 {
                    let refused = sqlstate(partition);
                    prop_assert_eq!(refused.as_deref(), Some("22023"));
                } else {
                    let (first, second) = (partition.unwrap(), again.unwrap());
                    prop_assert_eq!(first[0].get::<_, i64>(0), second[0].get::<_, i64>(0));
                }
                Ok(())
            },
        )
        .unwrap();
    let mut admin = cell.into_inner();
    let records: i64 = admin
        .query_one(
            "SELECT records FROM bussig.streams WHERE stream = $1::text",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(records, 0, "a refused or rolled-back append left a record");
}

/// Retention and the collection of shared bodies look again after a segment's lock with a snapshot
/// taken after it: in a REPEATABLE READ transaction, whose snapshot is older, they empty nothing.
#[test]
fn maintenance_in_a_repeatable_read_transaction_empties_no_segment() {
    let (_db, mut c) = Database::without_worker("stream_rr_maintenance");
    c.batch_execute(
        "SELECT bussig.create_stream('events', retention => '1 hour');
         SELECT bussig.append('events', '1');
         SELECT count(*) FROM bussig.stream_range('events', 0, 1);",
    )
    .unwrap();
    let age = "UPDATE bussig.stream_segment
               SET opened_at = opened_at - interval '3 hours', closed_at = closed_at - interval '3 hours'";
    let emptied = |c: &mut Client, isolation: &str| -> i64 {
        c.batch_execute(&format!("BEGIN ISOLATION LEVEL {isolation}"))
            .unwrap();
        let emptied: i64 = c
            .query_one(
                "SELECT (bussig.run_maintenance() ->> 'emptied_stream_segments')::bigint",
                &[],
            )
            .unwrap()
            .get(0);
        c.batch_execute("COMMIT").unwrap();
        emptied
    };
    // The first round closes the aged segment; the second finds it due.
    c.batch_execute(age).unwrap();
    assert_eq!(emptied(&mut c, "READ COMMITTED"), 0);
    c.batch_execute(age).unwrap();
    assert_eq!(emptied(&mut c, "REPEATABLE READ"), 0);
    let kept: i64 = c
        .query_one(
            "SELECT count(*) FROM bussig.stream_range('events', 0, 1)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "emptied under REPEATABLE READ");
    assert_eq!(emptied(&mut c, "READ COMMITTED"), 1);
}

/// A backend that appended before the ring moved on (and keeps the stream in its cache) appends
/// into the new current segment after it, singly and in batches, and a read finds them all in order.
#[test]
fn appends_after_a_rotation_go_into_the_new_current_segment() {
    let (db, mut admin) = Database::without_worker("stream_rotation_appends");
    admin
        .batch_execute("SELECT bussig.create_stream('events', retention => '1 hour')")
        .unwrap();
    let mut appender = db.connect();
    let append = |c: &mut Client, n: i32| {
        c.execute("SELECT bussig.append('events', to_jsonb($1::int))", &[&n])
            .unwrap();
    };
    let current = |c: &mut Client| -> i32 {
        c.query_one(
            "SELECT current_segment FROM bussig.stream WHERE name = 'events'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    append(&mut appender, 1);
    let first = current(&mut admin);
    // The segment has taken appends for more than half the retention: maintenance moves the ring on.
    admin
        .batch_execute(
            "UPDATE bussig.stream_segment SET opened_at = opened_at - interval '40 minutes'
             WHERE opened_at IS NOT NULL;
             SELECT bussig.run_maintenance();",
        )
        .unwrap();
    let second = current(&mut admin);
    assert_ne!(first, second, "maintenance moved the ring on");
    append(&mut appender, 2);
    append(&mut appender, 3);
    appender
        .execute(
            "SELECT bussig.append_batch('events', ARRAY['4'::jsonb, '5'::jsonb])",
            &[],
        )
        .unwrap();
    let by_segment: Vec<(i32, i64)> = admin
        .query(
            "SELECT segment, count(*) FROM bussig.stream_1 GROUP BY 1 ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let mut expected = vec![(first, 1), (second, 4)];
    expected.sort();
    assert_eq!(by_segment, expected);
    let payloads: Vec<i64> = admin
        .query(
            "SELECT payload::text::bigint FROM bussig.stream_range('events', 0, 1, 10) ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(payloads, [1, 2, 3, 4, 5]);
}

/// A seek while a member holds records it read in a transaction still open: the seek waits for that
/// transaction and ends its lease, so the member's commit cannot move the position past the seek.
#[test]
fn a_seek_holds_against_a_member_that_read_before_it() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "stream_seek_race", "partitions => 1");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "earliest");
    append_numbers(&mut admin, &name, 10, false);
    let mut member = connect();
    let mut tx = member.transaction().unwrap();
    let records = stream_read(&mut tx, &name, "g", 100, "0", "30 seconds");
    assert_eq!(records.len(), 10);
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let seek = {
        let (name, done) = (name.clone(), done.clone());
        thread::spawn(move || {
            let result =
                connect().execute("SELECT bussig.stream_seek($1::text, 'g', 0, 1)", &[&name]);
            done.store(true, Ordering::SeqCst);
            result.map(|_| ())
        })
    };
    thread::sleep(Duration::from_millis(300));
    assert!(
        !done.load(Ordering::SeqCst),
        "the seek did not wait for the member that holds the lease"
    );
    assert!(commit_all(&mut tx, &name, "g", &records));
    tx.commit().unwrap();
    seek.join().unwrap().expect("stream_seek");
    let replayed = stream_read(&mut member, &name, "g", 100, "0", "30 seconds");
    assert_eq!(
        replayed.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>(),
        "the seek was undone by the member's commit"
    );
}
