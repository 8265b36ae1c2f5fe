//! `read(wait => ...)`: a reader with nothing to read waits, is woken by the
//! committing writer within milliseconds or when a delay runs out, returns
//! empty when the wait ends, and can be interrupted by statement_timeout or
//! pg_cancel_backend. Queues with `notify => true` get a NOTIFY, from the
//! worker, after each committed transaction that made messages ready there.

use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use bussig_tests::*;

/// `read(queue, 10, wait => wait)`: the payloads it returned.
fn read_waiting(
    c: &mut impl GenericClient,
    queue: &str,
    wait: &str,
) -> Result<Vec<Value>, postgres::Error> {
    let rows = c.query(
        "SELECT payload FROM bussig.read($1::text, 10, wait => $2::text::interval)",
        &[&queue, &wait],
    )?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What a reader thread saw: the read's result and when it returned.
type Outcome = (Result<Vec<Value>, postgres::Error>, Instant, Client);

/// Starts `read(queue, wait => wait)` on `reader` in its own thread; returns
/// the reader's backend pid and the thread.
fn spawn_reader(mut reader: Client, queue: &str, wait: &str) -> (i32, JoinHandle<Outcome>) {
    let (queue, wait) = (queue.to_string(), wait.to_string());
    let (pid_sender, pid) = std::sync::mpsc::channel();
    let handle = thread::spawn(move || {
        // One transaction, so that a pooling proxy keeps the pid and the wait on one server connection.
        let mut tx = reader.transaction().unwrap();
        let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        pid_sender.send(pid).unwrap();
        let result = read_waiting(&mut tx, &queue, &wait);
        let returned = Instant::now();
        if result.is_ok() {
            tx.commit().unwrap();
        } else {
            drop(tx);
        }
        (result, returned, reader)
    });
    (pid.recv().expect("reader's pid"), handle)
}

/// Polls pg_stat_activity until backend `pid` sleeps in bussig's wait.
fn wait_until_waiting(observer: &mut Client, pid: i32) {
    eventually(
        Duration::from_secs(5),
        "the reader to wait (wait_event_type 'Extension')",
        || {
            let row = observer
                .query_opt(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .unwrap();
            let event: Option<String> = row.and_then(|r| r.get(0));
            (event.as_deref() == Some("Extension")).then_some(())
        },
    );
}

/// Sends `payload` with a 1 s delay; returns when the send committed.
fn send_delayed(c: &mut Client, queue: &str, payload: Value) -> Instant {
    c.execute(
        "SELECT bussig.send($1::text, $2::jsonb, delay => '1 second')",
        &[&queue, &payload],
    )
    .unwrap();
    Instant::now()
}

#[test]
fn commit_wakes_a_waiting_reader() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "long_poll_wake", "");
    let q = queue.name.as_str();

    let (pid, reader) = spawn_reader(connect(), q, "5 seconds");
    wait_until_waiting(&mut client, pid);

    send(&mut client, q, &json!({ "wake": "up" }));
    let committed = Instant::now();
    let (result, returned, _) = reader.join().expect("reader thread");
    let latency = returned.saturating_duration_since(committed);
    assert_eq!(result.expect("read"), vec![json!({ "wake": "up" })]);
    assert!(
        latency < Duration::from_millis(100),
        "the reader returned {latency:?} after the commit (expected < 100 ms)"
    );

    // A rolled-back send must not end the wait with a message; a committed
    // publish routed to the queue wakes the reader just like a send.
    let subject = format!("{}.wake", unique_name("long_poll"));
    client
        .execute(
            "SELECT bussig.subscribe($1::text, $2::text)",
            &[&q, &subject],
        )
        .unwrap();
    let (pid, reader) = spawn_reader(connect(), q, "5 seconds");
    wait_until_waiting(&mut client, pid);
    let mut tx = client.transaction().unwrap();
    send(&mut tx, q, &json!({ "rolled": "back" }));
    tx.rollback().unwrap();
    let published: i32 = client
        .query_one(
            "SELECT bussig.publish($1::text, '{\"published\": true}')",
            &[&subject],
        )
        .unwrap()
        .get(0);
    assert_eq!(published, 1);
    let committed = Instant::now();
    let (result, returned, _) = reader.join().expect("reader thread");
    let latency = returned.saturating_duration_since(committed);
    assert_eq!(result.expect("read"), vec![json!({ "published": true })]);
    assert!(
        latency < Duration::from_millis(100),
        "the reader returned {latency:?} after the publish committed (expected < 100 ms)"
    );
}

#[test]
fn delayed_message_ends_the_wait_when_it_becomes_ready() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "long_poll_delay", "");
    let q = queue.name.as_str();

    // The delayed message exists before the reader starts waiting.
    let sent = send_delayed(&mut client, q, json!({ "delayed": "before" }));
    let (_, reader) = spawn_reader(connect(), q, "5 seconds");
    let (result, returned, _) = reader.join().expect("reader thread");
    let elapsed = returned.duration_since(sent);
    assert_eq!(result.expect("read"), vec![json!({ "delayed": "before" })]);
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed <= Duration::from_secs(3),
        "read returned {elapsed:?} after a 1 s delayed send (expected 0.9–3 s)"
    );
}

#[test]
fn delayed_message_sent_during_the_wait_ends_it_when_ready() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "long_poll_delay_during", "");
    let q = queue.name.as_str();

    // The delayed message is sent while the reader already waits: it becomes
    // ready after 1 s, and the reader waiting for a ready message returns then.
    let (pid, reader) = spawn_reader(connect(), q, "5 seconds");
    wait_until_waiting(&mut client, pid);
    let sent = send_delayed(&mut client, q, json!({ "delayed": "during" }));
    let (result, returned, _) = reader.join().expect("reader thread");
    let elapsed = returned.saturating_duration_since(sent);
    assert_eq!(result.expect("read"), vec![json!({ "delayed": "during" })]);
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed <= Duration::from_secs(3),
        "read returned {elapsed:?} after a 1 s delayed send made during the wait \
         (expected 0.9–3 s)"
    );
}

#[test]
fn wait_without_messages_returns_empty() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "long_poll_empty", "");
    let q = queue.name.as_str();

    let started = Instant::now();
    let got = read_waiting(&mut client, q, "0.5 seconds").expect("read");
    let elapsed = started.elapsed();
    assert!(got.is_empty(), "nothing was sent, got {got:?}");
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed <= Duration::from_secs(2),
        "a 0.5 s wait took {elapsed:?} (expected 0.4–2 s)"
    );

    // A message that is locked by someone else does not end the wait either.
    send(&mut client, q, &json!({ "locked": true }));
    let mut other = connect();
    assert_eq!(read(&mut other, q, 1, Some("1 minute")).len(), 1);
    let started = Instant::now();
    let got = read_waiting(&mut client, q, "0.5 seconds").expect("read");
    let elapsed = started.elapsed();
    assert!(got.is_empty(), "a locked message was delivered: {got:?}");
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed <= Duration::from_secs(2),
        "a 0.5 s wait took {elapsed:?} (expected 0.4–2 s)"
    );
}

#[test]
fn statement_timeout_ends_a_wait() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "long_poll_timeout", "");
    let q = queue.name.as_str();

    let mut tx = client.transaction().unwrap();
    tx.batch_execute("SET LOCAL statement_timeout = '300ms'")
        .unwrap();
    let started = Instant::now();
    let err = read_waiting(&mut tx, q, "5 seconds").expect_err("statement_timeout");
    let elapsed = started.elapsed();
    drop(tx);
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(3),
        "a 300 ms statement_timeout ended the wait after {elapsed:?}"
    );

    // The same connection reads normally right after.
    send(&mut client, q, &json!({ "after": "timeout" }));
    let got = read_waiting(&mut client, q, "0 seconds").expect("read after timeout");
    assert_eq!(got, vec![json!({ "after": "timeout" })]);
    let got = read_waiting(&mut client, q, "0.1 seconds").expect("a short wait after timeout");
    assert!(got.is_empty(), "{got:?}");

    // ... and can still be woken by a commit.
    let (pid, reader) = spawn_reader(client, q, "5 seconds");
    let mut writer = connect();
    wait_until_waiting(&mut writer, pid);
    send(&mut writer, q, &json!({ "woken": "after timeout" }));
    let committed = Instant::now();
    let (result, returned, _) = reader.join().expect("reader thread");
    assert_eq!(
        result.expect("read"),
        vec![json!({ "woken": "after timeout" })]
    );
    let latency = returned.saturating_duration_since(committed);
    assert!(
        latency < Duration::from_millis(100),
        "woken {latency:?} after the commit (expected < 100 ms)"
    );
}

#[test]
fn cancel_ends_a_wait() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "long_poll_cancel", "");
    let q = queue.name.as_str();

    let (pid, reader) = spawn_reader(connect(), q, "5 seconds");
    wait_until_waiting(&mut client, pid);
    let canceled: bool = client
        .query_one("SELECT pg_cancel_backend($1)", &[&pid])
        .unwrap()
        .get(0);
    assert!(canceled, "pg_cancel_backend({pid})");
    let asked = Instant::now();
    let (result, returned, mut reader) = reader.join().expect("reader thread");
    let err = result.expect_err("a canceled wait must fail");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    let latency = returned.saturating_duration_since(asked);
    assert!(
        latency < Duration::from_secs(1),
        "the wait ended {latency:?} after pg_cancel_backend"
    );

    // The canceled connection is usable: it reads what is there.
    send(&mut client, q, &json!({ "after": "cancel" }));
    let got = read_waiting(&mut reader, q, "1 second").expect("read after cancel");
    assert_eq!(got, vec![json!({ "after": "cancel" })]);
}

#[test]
fn notify_queue_is_notified_after_each_commit() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "long_poll_notify", "notify => true");
    let q = queue.name.as_str();
    let channel = format!("bussig_{q}");
    let subject = format!("{}.note", unique_name("long_poll_notify"));
    client
        .execute(
            "SELECT bussig.subscribe($1::text, $2::text)",
            &[&q, &subject],
        )
        .unwrap();

    let mut listener = connect_session();
    listener
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .unwrap();
    // The worker sends it, after the commit: notifying transactions commit one at a time.
    let worker_pid: i32 = eventually(
        Duration::from_secs(10),
        "one worker in this database",
        || {
            let rows = client
                .query(
                    "SELECT pid FROM pg_stat_activity
                  WHERE backend_type = 'bussig worker' AND datname = current_database()",
                    &[],
                )
                .unwrap();
            (rows.len() == 1).then(|| rows[0].get(0))
        },
    );

    // Rolled back: no notification.
    let mut tx = client.transaction().unwrap();
    send(&mut tx, q, &json!({ "rolled": "back" }));
    tx.rollback().unwrap();
    let got = collect_notifications(&mut listener, &channel, 0, Duration::from_millis(500));
    assert!(got.is_empty(), "a rolled-back send notified: {got:?}");

    // Each commit that made messages ready is followed by one notification: three sends and a
    // publish in one transaction, a send_batch on its own, a publish on its own.
    let mut tx = client.transaction().unwrap();
    for n in 0..3 {
        send(&mut tx, q, &json!({ "n": n }));
    }
    tx.execute("SELECT bussig.publish($1::text, '{\"n\": 3}')", &[&subject])
        .unwrap();
    tx.commit().unwrap();
    let mut got = collect_notifications(&mut listener, &channel, 1, Duration::from_millis(300));
    send_batch(&mut client, q, &[json!({ "n": 4 }), json!({ "n": 5 })]);
    got.extend(collect_notifications(
        &mut listener,
        &channel,
        1,
        Duration::from_millis(300),
    ));
    client
        .execute("SELECT bussig.publish($1::text, '{\"n\": 6}')", &[&subject])
        .unwrap();
    got.extend(collect_notifications(
        &mut listener,
        &channel,
        1,
        Duration::from_millis(500),
    ));
    assert_eq!(
        got.len(),
        3,
        "expected one notification per committed transaction, got {got:?}"
    );
    for n in &got {
        assert_eq!(n.channel(), channel);
        assert_eq!(n.process_id(), worker_pid, "{n:?}");
    }

    // Reading and acking make nothing ready: no notification.
    let mut reader = connect();
    let delivered = read(&mut reader, q, 10, None);
    assert_eq!(delivered.len(), 7, "{delivered:?}");
    for d in &delivered {
        assert!(ack(&mut reader, q, d.id, d.token));
    }
    let got = collect_notifications(&mut listener, &channel, 0, Duration::from_millis(500));
    assert!(got.is_empty(), "read/ack notified: {got:?}");
}

#[test]
fn a_dead_letter_notifies_a_dead_letter_queue_that_asked() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "long_poll_dead_notify", "");
    let dead_letters = queue.dlq();
    client
        .execute(
            "SELECT bussig.alter_queue($1::text, notify => true)",
            &[&dead_letters],
        )
        .unwrap();
    let channel = format!("bussig_{dead_letters}");
    let mut listener = connect_session();
    listener
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .unwrap();

    send(&mut client, &queue.name, &json!({ "poison": true }));
    let delivered = read(&mut client, &queue.name, 1, None);
    let moved: bool = client
        .query_one(
            "SELECT bussig.dead_letter($1::text, $2, $3)",
            &[&queue.name, &delivered[0].id, &delivered[0].token],
        )
        .unwrap()
        .get(0);
    assert!(moved);
    let got = collect_notifications(&mut listener, &channel, 1, Duration::from_millis(500));
    assert_eq!(
        got.len(),
        1,
        "expected the dead-letter queue's notification, got {got:?}"
    );
}

/// Many readers wait on one queue; each commit wakes as many as its messages need (here two each),
/// and every message reaches a reader at once, whatever the mix of commits.
#[test]
fn every_message_reaches_one_of_many_waiting_readers_at_once() {
    let mut writer = connect();
    let queue = Queue::create(&mut writer, "many_waiting", "");
    let mut observer = connect();
    let (done, returned) = std::sync::mpsc::channel::<usize>();
    let mut readers = Vec::new();
    for _ in 0..12 {
        let (pid_sender, pid) = std::sync::mpsc::channel();
        let (name, done) = (queue.name.clone(), done.clone());
        readers.push(thread::spawn(move || {
            let mut reader = connect();
            let mut tx = reader.transaction().unwrap();
            let me: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
            pid_sender.send(me).unwrap();
            let got = tx
                .query(
                    "SELECT message_id FROM bussig.read($1::text, 2, wait => '20 seconds')",
                    &[&name],
                )
                .unwrap()
                .len();
            tx.commit().unwrap();
            done.send(got).unwrap();
        }));
        wait_until_waiting(&mut observer, pid.recv().unwrap());
    }
    let delivered_within = |count: usize| -> Vec<usize> {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut got = Vec::new();
        while got.iter().sum::<usize>() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match returned.recv_timeout(left) {
                Ok(n) => got.push(n),
                Err(_) => panic!("after 3 s readers returned {got:?}, not all of {count} messages"),
            }
        }
        got
    };
    let send_n = |c: &mut Client, n: usize| {
        let payloads = vec![json!({ "n": 1 }); n];
        send_batch(c, &queue.name, &payloads);
    };

    // Which reader gets how many of a commit's messages is a race; that all of them are taken at once,
    // by readers taking at most 2 each, is not.
    let mut returned_readers = Vec::new();
    for (sent, expected) in [(1, None), (7, None), (30, Some(2))] {
        send_n(&mut writer, sent);
        let left = 12 - returned_readers.len();
        let wanted = expected.map_or(sent, |each| each * left);
        let got = delivered_within(wanted);
        assert!(got.iter().all(|&n| (1..=2).contains(&n)), "{got:?}");
        returned_readers.extend(got);
    }
    assert_eq!(
        returned_readers.len(),
        12,
        "every reader returned: {returned_readers:?}"
    );
    for reader in readers {
        reader.join().unwrap();
    }
    let taken: usize = returned_readers.iter().sum();
    assert_eq!(counts(&mut writer, &queue.name).0, 38 - taken as i64);
}

/// Readers that long-poll in a loop, as consumers do, while messages trickle in bursts: each commit
/// wakes as few readers as it needs, and a wake that were lost (a commit between a reader's read and
/// its registration, or one that passed a woken reader by) would leave its message until some wait
/// ran out, 10 s later. Every message must reach a reader soon after it was sent.
#[test]
fn a_trickle_reaches_readers_that_long_poll_in_a_loop_without_a_lost_wake() {
    const READERS: usize = 12;
    const MESSAGES: i64 = 240;
    let mut writer = connect();
    let queue = Queue::create(&mut writer, "trickle_to_many", "");
    let started = Instant::now();
    let millis = move || started.elapsed().as_millis() as i64;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let latencies: Vec<i64> = thread::scope(|s| {
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let (name, stop) = (&queue.name, &stop);
                s.spawn(move || {
                    let mut reader = connect();
                    let mut latencies = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let rows = reader
                            .query(
                                "SELECT message_id, lock_token, (payload ->> 'sent')::int8, payload ? 'last'
                                 FROM bussig.read($1::text, 5, wait => '10 s')",
                                &[name],
                            )
                            .unwrap();
                        let now = millis();
                        for row in rows {
                            if !row.get::<_, bool>(3) {
                                latencies.push(now - row.get::<_, i64>(2));
                            }
                            let (id, token): (i64, uuid::Uuid) = (row.get(0), row.get(1));
                            reader
                                .execute("SELECT bussig.ack($1::text, $2, $3)", &[name, &id, &token])
                                .unwrap();
                        }
                    }
                    latencies
                })
            })
            .collect();
        let mut dice = Dice(0x9E37_79B9_7F4A_7C15);
        let mut sent = 0;
        while sent < MESSAGES {
            let burst = (1 + dice.below(3)) as i64;
            for _ in 0..burst.min(MESSAGES - sent) {
                send(&mut writer, &queue.name, &json!({ "sent": millis() }));
                sent += 1;
            }
            thread::sleep(Duration::from_millis(dice.below(25)));
        }
        eventually(Duration::from_secs(15), "every message acked", || {
            (counts(&mut writer, &queue.name).0 == 0).then_some(())
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Readers still waiting return with the next messages or at the end of their wait.
        let last = json!({ "sent": millis(), "last": true });
        send_batch(&mut writer, &queue.name, &vec![last; READERS * 5]);
        readers
            .into_iter()
            .flat_map(|reader| reader.join().unwrap())
            .collect()
    });
    assert_eq!(
        latencies.len() as i64,
        MESSAGES,
        "every message delivered once"
    );
    let slowest = latencies.iter().max().copied().unwrap_or(0);
    assert!(
        slowest < 3_000,
        "a message waited {slowest} ms for a reader: a wake was lost"
    );
}

/// A reader whose consume privilege is revoked while it waits gets 42501 when it is woken, not the
/// message that woke it: each pass checks again, in a new snapshot.
#[test]
fn a_revoke_during_a_wait_ends_it_with_42501() {
    let mut admin = connect();
    let queue = Queue::create(&mut admin, "revoke_wait", "");
    let role = Role::create("revoke_wait");
    admin
        .execute(
            "SELECT bussig.grant($1::text, $2::text, ARRAY['consume'])",
            &[&queue.name, &role.name],
        )
        .unwrap();
    let (q, name) = (queue.name.clone(), role.name.clone());
    let (pid_sender, pid) = std::sync::mpsc::channel();
    let mut reader = connect();
    let handle = thread::spawn(move || {
        let mut tx = reader.transaction().unwrap();
        tx.batch_execute(&format!("SET LOCAL ROLE \"{name}\""))
            .unwrap();
        let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        pid_sender.send(pid).unwrap();
        read_waiting(&mut tx, &q, "10 seconds")
    });
    wait_until_waiting(&mut admin, pid.recv().expect("reader's pid"));
    admin
        .execute(
            "SELECT bussig.revoke($1::text, $2::text)",
            &[&queue.name, &role.name],
        )
        .unwrap();
    send(&mut admin, &queue.name, &serde_json::json!({ "k": 1 }));
    let denied = handle.join().unwrap().expect_err("read after the revoke");
    assert_eq!(denied.code().map(|c| c.code()), Some("42501"));
    assert_eq!(
        read(&mut admin, &queue.name, 10, None).len(),
        1,
        "the message is still ready"
    );
}

/// A consumer whose transaction outlives the lock of what it read commits without settling it: the
/// message is ready from that commit on, and a reader that passed over its row while it was held,
/// and has waited since, is woken for it (nothing else would wake it before its wait ends).
#[test]
fn a_lapsed_lock_committed_wakes_a_reader_that_passed_it_over() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "long_poll_lapsed", "");
    let q = queue.name.as_str();
    send(&mut client, q, &json!({ "held": "long" }));
    let mut consumer = connect();
    let mut held = consumer.transaction().unwrap();
    assert_eq!(read(&mut held, q, 1, Some("200 milliseconds")).len(), 1);
    let (pid, reader) = spawn_reader(connect(), q, "10 seconds");
    wait_until_waiting(&mut client, pid);
    // Past the lock's end, the consumer's transaction still open.
    thread::sleep(Duration::from_millis(400));
    held.commit().unwrap();
    let committed = Instant::now();
    let (result, returned, _) = reader.join().expect("reader thread");
    assert_eq!(result.expect("read"), vec![json!({ "held": "long" })]);
    let latency = returned.saturating_duration_since(committed);
    assert!(
        latency < Duration::from_secs(1),
        "the reader returned {latency:?} after the commit (its wait was 10 s)"
    );
}

/// A lock made to end sooner (`extend_lock` with a shorter timeout, in a queue with and without a
/// cap): a reader waiting on the queue had planned to sleep until its wait's end, past the message's
/// new lock end, and is woken to sleep only until then.
#[test]
fn a_lock_made_to_end_sooner_ends_a_waiting_readers_sleep_then() {
    for options in ["", "max_in_flight => 5"] {
        let mut client = connect();
        let queue = Queue::create(&mut client, "long_poll_sooner", options);
        let q = queue.name.as_str();
        send(&mut client, q, &json!({ "locked": "long" }));
        let delivery = read(&mut client, q, 1, Some("1 hour")).remove(0);
        let (pid, reader) = spawn_reader(connect(), q, "10 seconds");
        wait_until_waiting(&mut client, pid);
        let shortened = Instant::now();
        let extended: bool = client
            .query_one(
                "SELECT bussig.extend_lock($1::text, $2, $3, '300 milliseconds')",
                &[&q, &delivery.id, &delivery.token],
            )
            .unwrap()
            .get(0);
        assert!(extended);
        let (result, returned, _) = reader.join().expect("reader thread");
        assert_eq!(result.expect("read"), vec![json!({ "locked": "long" })]);
        let latency = returned.saturating_duration_since(shortened);
        assert!(
            latency < Duration::from_secs(3),
            "{options:?}: the reader returned {latency:?} after the lock was shortened to 300 ms"
        );
    }
}
