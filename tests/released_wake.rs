//! A read whose transaction rolls back gives its messages back: readers waiting on the queue are
//! woken for them at once, not at the end of their wait.
use std::thread;
use std::time::{Duration, Instant};

use bussig_tests::*;

#[test]
fn a_rolled_back_read_wakes_a_waiting_reader() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "released_wake", "");
    let name = queue.name.clone();
    send(&mut client, &name, &json!({ "taken": "and given back" }));

    // The first consumer takes the message in a transaction it will roll back.
    let mut first = connect();
    let mut taking = first.transaction().unwrap();
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

    taking.rollback().unwrap();
    let rolled_back = Instant::now();
    let (got, returned) = reader.join().unwrap();
    let latency = returned.saturating_duration_since(rolled_back);
    assert_eq!(got, 1, "the waiting reader got the message given back");
    assert!(
        latency < Duration::from_secs(2),
        "the waiting reader returned {latency:?} after the rollback (its wait was 10 s)"
    );
}
