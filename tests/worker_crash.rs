//! A large fan-out is delivered exactly once per queue even when the worker
//! is killed (SIGKILL) in the middle of it.
//!
//! Killing a backend with SIGKILL makes the postmaster restart every process
//! of the cluster (crash recovery): this test disrupts every other test
//! running against the same server, so it is a binary of its own, to be run
//! alone after the others.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use bussig_tests::*;

const QUEUES: i64 = 3000;
const MESSAGES: i64 = 30;
const DELIVERIES: i64 = QUEUES * MESSAGES;

/// Connects, retrying while the server restarts; `None` at the deadline.
fn try_connect(deadline: Instant) -> Option<Client> {
    let url = std::env::var("BUSSIG_TEST_URL").expect("BUSSIG_TEST_URL is not set");
    loop {
        if let Ok(mut client) = Client::connect(&url, NoTls) {
            if client
                .batch_execute("SET statement_timeout = '120s'")
                .is_ok()
            {
                return Some(client);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Drops the test's queues (and their dead-letter queues) even if the test
/// panics, once the server accepts connections.
struct Cleanup {
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(mut client) = try_connect(Instant::now() + Duration::from_secs(60)) else {
            return;
        };
        let _ = client.batch_execute("SET lock_timeout = '30s'; SET statement_timeout = '300s'");
        let started = Instant::now();
        // drop_queue returns false for a queue that does not exist.
        let dropped = client.query_one(
            "SELECT count(*) FILTER (WHERE bussig.drop_queue($1 || '_' || n)) \
             FROM generate_series(1, $2::int) n",
            &[&self.prefix, &(QUEUES as i32)],
        );
        match dropped {
            Ok(row) => eprintln!(
                "cleanup: dropped {} queues in {:?}",
                row.get::<_, i64>(0),
                started.elapsed()
            ),
            Err(e) => eprintln!("cleanup failed: {e}"),
        }
    }
}

fn delivered(client: &mut Client, subject: &str) -> Result<i64, postgres::Error> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM bussig.message WHERE subject = $1",
            &[&subject],
        )?
        .get(0))
}

/// The database's worker; the longest-running one should the launcher have
/// started a second (which exits at once: one worker per database).
fn worker_pid(client: &mut Client) -> Option<i32> {
    client
        .query_opt(
            "SELECT pid FROM pg_stat_activity \
             WHERE backend_type = 'bussig worker' AND datname = current_database() \
             ORDER BY backend_start LIMIT 1",
            &[],
        )
        .unwrap()
        .map(|r| r.get(0))
}

#[test]
fn fan_out_survives_worker_kill() {
    let started = Instant::now();
    let mut client = try_connect(Instant::now()).expect("connect to BUSSIG_TEST_URL");
    let prefix = unique_name("crash");
    let subject = format!("{prefix}.fan");
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };

    let subscribed: i64 = client
        .query_one(
            "SELECT count(bussig.subscribe($1 || '_' || n, $2::text)) \
             FROM generate_series(1, $3::int) n",
            &[&prefix, &subject, &(QUEUES as i32)],
        )
        .expect("subscribe the queues")
        .get(0);
    assert_eq!(subscribed, QUEUES);
    eprintln!("subscribed {QUEUES} queues after {:?}", started.elapsed());

    let mut tx = client.transaction().unwrap();
    for n in 0..MESSAGES {
        let reached: i32 = tx
            .query_one(
                "SELECT bussig.publish($1::text, jsonb_build_object('n', $2::int))",
                &[&subject, &(n as i32)],
            )
            .unwrap()
            .get(0);
        assert_eq!(reached as i64, QUEUES, "publish {n}");
    }
    tx.commit().unwrap();
    let committed = Instant::now();

    // Kill the worker as soon as it has delivered some, but not all.
    let (killed_pid, at_kill) = loop {
        let count = delivered(&mut client, &subject).unwrap();
        assert!(
            count < DELIVERIES,
            "the worker delivered all {DELIVERIES} messages in {:?} before it could be \
             killed: the test needs a bigger fan-out",
            committed.elapsed()
        );
        if count > 0 {
            let pid = worker_pid(&mut client).expect("a bussig worker for this database");
            let status = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -9 {pid}: {status}");
            break (pid, count);
        }
        assert!(
            committed.elapsed() < Duration::from_secs(30),
            "the worker delivered nothing within 30 s of the commit"
        );
        thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "killed worker {killed_pid} {:?} after the commit, with {at_kill} of {DELIVERIES} delivered",
        committed.elapsed()
    );

    // The postmaster ends every backend, ours included, then recovers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if client.batch_execute("SELECT 1").is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "our connection survived the worker's SIGKILL: no crash restart happened"
        );
        thread::sleep(Duration::from_millis(50));
    }
    drop(client);
    let mut client = try_connect(deadline).expect("the server accepts connections within 60 s");
    eprintln!("reconnected {:?} after the commit", committed.elapsed());

    // A new worker finishes the fan-out: exactly once per queue.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let count = match delivered(&mut client, &subject) {
            Ok(count) => count,
            Err(e) => panic!("count after recovery: {e}"),
        };
        assert!(
            count <= DELIVERIES,
            "{count} deliveries, more than {DELIVERIES}: some queue got a message twice"
        );
        if count == DELIVERIES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {count} of {DELIVERIES} delivered 90 s after recovery (at the kill: {at_kill})"
        );
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("all delivered {:?} after the commit", committed.elapsed());

    let new_pid = worker_pid(&mut client).expect("a restarted bussig worker");
    assert_ne!(new_pid, killed_pid, "the worker was not restarted");

    let per_queue: Vec<(String, i64)> = client
        .query(
            "SELECT q.name, count(m.message_id) \
             FROM generate_series(1, $2::int) n \
             JOIN bussig.queue q ON q.name = $1 || '_' || n \
             LEFT JOIN bussig.message m ON m.queue_id = q.queue_id AND m.subject = $3 \
             GROUP BY q.name",
            &[&prefix, &(QUEUES as i32), &subject],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(per_queue.len() as i64, QUEUES, "queues found");
    let wrong: Vec<&(String, i64)> = per_queue.iter().filter(|(_, n)| *n != MESSAGES).collect();
    assert!(
        wrong.is_empty(),
        "{} queues do not hold exactly {MESSAGES} messages, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );

    let duplicates: Vec<(String, serde_json::Value, i64)> = client
        .query(
            "SELECT q.name, coalesce(m.payload, b.payload), count(*) \
             FROM bussig.message m \
             JOIN bussig.queue q USING (queue_id) \
             LEFT JOIN bussig.body b USING (body_id) \
             WHERE m.subject = $1 \
             GROUP BY 1, 2 HAVING count(*) > 1 LIMIT 10",
            &[&subject],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        duplicates.is_empty(),
        "(queue, payload) pairs delivered more than once: {duplicates:?}"
    );

    // What a consumer sees agrees: one queue, read through the API.
    let one = format!("{prefix}_{}", QUEUES / 2);
    let mut got: Vec<i64> = read(&mut client, &one, 100, None)
        .iter()
        .map(|d| d.payload["n"].as_i64().expect("payload n"))
        .collect();
    got.sort();
    assert_eq!(got, (0..MESSAGES).collect::<Vec<_>>(), "messages of {one}");
    eprintln!("checked {:?} after the start", started.elapsed());
}
