//! A read whose transaction, or whose savepoint, rolls back gives its messages back: readers waiting
//! on the queue are woken for them at once, not at the end of their wait.
use std::thread;
use std::time::{Duration, Instant};

use bussig_tests::*;

#[test]
fn a_rolled_back_read_wakes_a_waiting_reader() {
    a_read_given_back_wakes_a_waiting_reader(
        "released_wake",
        |_| {},
        |taking| taking.rollback().unwrap(),
    );
}

#[test]
fn a_read_rolled_back_to_its_savepoint_wakes_a_waiting_reader() {
    a_read_given_back_wakes_a_waiting_reader(
        "released_wake_savepoint",
        |taking| taking.batch_execute("SAVEPOINT before_read").unwrap(),
        // The transaction goes on after the savepoint's rollback: the wake cannot wait for its end.
        |mut taking| {
            taking
                .batch_execute("ROLLBACK TO SAVEPOINT before_read")
                .unwrap();
            thread::sleep(Duration::from_secs(3));
            taking.commit().unwrap();
        },
    );
}

/// One consumer reads the queue's one message after `before_read`, a second long-polls for it, and
/// `give_back` undoes the first read: the second must return with the message at once.
fn a_read_given_back_wakes_a_waiting_reader(
    queue_name: &str,
    before_read: impl FnOnce(&mut Transaction<'_>),
    give_back: impl FnOnce(Transaction<'_>),
) {
    let mut client = connect();
    let queue = Queue::create(&mut client, queue_name, "");
    let name = queue.name.clone();
    send(&mut client, &name, &json!({ "taken": "and given back" }));

    // The first consumer takes the message in a transaction it will roll back.
    let mut first = connect();
    let mut taking = first.transaction().unwrap();
    before_read(&mut taking);
    let taken = taking
        .query("SELECT message_id FROM bussig.read($1::text, 10)", &[&name])
        .unwrap();
    assert_eq!(taken.len(), 1);

    // The second waits: the message is locked by an open transaction, so it finds nothing.
    let (pid_sender, pid) = std::sync::mpsc::channel();
    let waiting_name = name.clone();
    let reader = thread::spawn(move || {
        let mut second = connect();
        let mut tx = second.transaction().unwrap();
        let me: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        pid_sender.send(me).unwrap();
        let got = tx
            .query(
                "SELECT payload FROM bussig.read($1::text, 10, wait => '10 seconds')",
                &[&waiting_name],
            )
            .unwrap();
        let returned = Instant::now();
        tx.commit().unwrap();
        (got.len(), returned)
    });
    let pid = pid.recv().unwrap();
    eventually(Duration::from_secs(5), "the second reader to wait", || {
        let event: Option<String> = client
            .query_one(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .unwrap()
            .get(0);
        (event.as_deref() == Some("Extension")).then_some(())
    });

    let rolled_back = Instant::now();
    give_back(taking);
    let (got, returned) = reader.join().unwrap();
    let latency = returned.saturating_duration_since(rolled_back);
    assert_eq!(got, 1, "the waiting reader got the message given back");
    assert!(
        latency < Duration::from_secs(2),
        "the waiting reader returned {latency:?} after the rollback (its wait was 10 s)"
    );
}
