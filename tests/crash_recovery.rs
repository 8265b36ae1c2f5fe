//! Crashes and stops in the middle of work: a consumer backend killed with SIGKILL inside a long
//! poll (the postmaster then restarts every process), `pg_ctl stop -m immediate` under load, waiting
//! reads ended by pg_terminate_backend, pg_cancel_backend and statement_timeout more often than
//! there are wait slots, and a fast shutdown with readers waiting. After each, nothing committed is
//! lost, nothing acked comes back, nothing is there twice, and nothing is stuck.
//!
//! These tests stop and restart the whole server: run them alone, last
//! (`cargo test -p bussig-tests --test crash_recovery -- --test-threads=1`), with
//! `BUSSIG_TEST_PGDATA` naming the cluster's data directory. They also hold a lock so that they
//! never overlap each other, and every test leaves the server running, even when it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use bussig_tests::*;

/// One server, one test at a time, whatever --test-threads says.
static SERVER: Mutex<()> = Mutex::new(());

/// Locks without cascading poison: the first panic is the one worth reading.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn data_dir() -> String {
    std::env::var("BUSSIG_TEST_PGDATA").expect(
        "BUSSIG_TEST_PGDATA is not set: these tests stop and restart the server and need its data \
         directory; `make test` sets it",
    )
}

/// pg_ctl as the owner of the data directory: pg_ctl refuses to run as root.
fn pg_ctl(args: &[&str]) -> Output {
    let dir = data_dir();
    let owner = std::fs::metadata(&dir)
        .unwrap_or_else(|e| panic!("BUSSIG_TEST_PGDATA={dir}: {e}"))
        .uid();
    let me = std::fs::metadata("/proc/self").expect("/proc/self").uid();
    let pg_ctl = pg_program("pg_ctl");
    let mut command = if me == 0 && owner != 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &pg_ctl]);
        c
    } else {
        Command::new(&pg_ctl)
    };
    // A Rust backtrace setting inherited by the server would end up in every error's DETAIL.
    command
        .env_remove("RUST_BACKTRACE")
        .args(["-D", &dir])
        .args(args)
        .output()
        .expect("run pg_ctl")
}

fn server_running() -> bool {
    pg_ctl(&["status"]).status.success()
}

fn start_server() {
    let log = format!("{}/restart.log", data_dir());
    let output = pg_ctl(&["-w", "-t", "60", "-l", &log, "start"]);
    assert!(
        output.status.success(),
        "pg_ctl start failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `pg_ctl stop -m mode`; how long it took.
fn stop_server(mode: &str) -> Duration {
    let started = Instant::now();
    let output = pg_ctl(&["-w", "-t", "60", "-m", mode, "stop"]);
    assert!(
        output.status.success(),
        "pg_ctl stop -m {mode} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    started.elapsed()
}

fn try_connect() -> Option<Client> {
    let url =
        std::env::var("BUSSIG_TEST_URL").expect("BUSSIG_TEST_URL is not set: run `make test`");
    let mut client = Client::connect(&url, NoTls).ok()?;
    client.batch_execute("SET statement_timeout = '30s'").ok()?;
    Some(client)
}

/// Waits (60 s at most) until the server accepts connections and answers.
fn connect_after_restart() -> Client {
    eventually(
        Duration::from_secs(60),
        "the server to accept connections again",
        || {
            let mut client = try_connect()?;
            client.batch_execute("SELECT 1").ok()?;
            Some(client)
        },
    )
}

/// Waits until `client`'s backend is gone: the postmaster's crash restart ends every backend.
fn wait_until_disconnected(client: &mut Client) {
    eventually(
        Duration::from_secs(60),
        "our own backend to be ended by the restart",
        || client.batch_execute("SELECT 1").is_err().then_some(()),
    );
}

/// Restarts the server at the end of a test if it is not running, even when the test failed.
struct ServerGuard;

impl ServerGuard {
    /// Checks first that BUSSIG_TEST_PGDATA is the data directory of the server `client` talks to:
    /// the tests must never stop some other server.
    fn new(client: &mut Client) -> ServerGuard {
        let dir = data_dir();
        let served: String = client
            .query_one("SHOW data_directory", &[])
            .expect("SHOW data_directory")
            .get(0);
        let canonical = |path: &str| {
            std::fs::canonicalize(path).unwrap_or_else(|e| panic!("data directory {path}: {e}"))
        };
        assert_eq!(
            canonical(&dir),
            canonical(&served),
            "BUSSIG_TEST_PGDATA is not the data directory of the server BUSSIG_TEST_URL names"
        );
        assert!(
            server_running(),
            "pg_ctl status says no server runs in {dir}"
        );
        ServerGuard
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if !server_running() {
            let log = format!("{}/restart.log", data_dir());
            let output = pg_ctl(&["-w", "-t", "60", "-l", &log, "start"]);
            if !output.status.success() {
                eprintln!("could not restart the server: {output:?}");
                return;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while try_connect().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The backend pid of `client`.
fn backend_pid(client: &mut Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0)
}

/// Polls until every backend in `pids` sleeps in bussig's wait.
fn wait_until_waiting(observer: &mut Client, pids: &[i32]) {
    eventually(
        Duration::from_secs(10),
        "the readers to wait (wait_event_type 'Extension')",
        || {
            let waiting: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                 WHERE pid = ANY ($1) AND wait_event_type = 'Extension'",
                    &[&pids],
                )
                .unwrap()
                .get(0);
            (waiting == pids.len() as i64).then_some(())
        },
    );
}

fn kill_9(pid: i32) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -9 {pid}: {status}");
}

/// `read(queue, 10, wait => wait)` on its own thread: the thread returns the read's outcome.
fn spawn_waiting_read(
    mut reader: Client,
    queue: &str,
    wait: &str,
) -> thread::JoinHandle<(Result<usize, postgres::Error>, Client)> {
    let (queue, wait) = (queue.to_string(), wait.to_string());
    thread::spawn(move || {
        let result = reader
            .query(
                "SELECT message_id FROM bussig.read($1::text, 10, wait => $2::text::interval)",
                &[&queue, &wait],
            )
            .map(|rows| rows.len());
        (result, reader)
    })
}

// ---------------------------------------------------------------------------------------------
// Load that keeps a ledger through crashes

/// What producers and consumers know for sure, and what they cannot know.
#[derive(Default)]
struct Ledger {
    /// Sends whose COMMIT returned OK.
    committed: BTreeSet<String>,
    /// Sends whose COMMIT got no answer: the server died around it.
    commit_in_doubt: BTreeSet<String>,
    /// Sends rolled back, on purpose or by an error before COMMIT.
    rolled_back: BTreeSet<String>,
    /// Keys some consumer read.
    delivered: BTreeSet<String>,
    /// ack returned true (autocommit: committed).
    acked: BTreeSet<String>,
    /// ack got no answer.
    ack_in_doubt: BTreeSet<String>,
}

/// Tells the load to stop when dropped, so that a failing test does not wait for it forever.
struct StopLoad<'a>(&'a Load);

impl Drop for StopLoad<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }
}

struct Load {
    queue: String,
    stop: AtomicBool,
    ledger: Mutex<Ledger>,
}

impl Load {
    fn new(queue: &str) -> Load {
        Load {
            queue: queue.to_string(),
            stop: AtomicBool::new(false),
            ledger: Mutex::default(),
        }
    }

    /// Runs `producers` and `consumers` threads until `stop`; they reconnect whenever the server
    /// goes away.
    fn run<'s>(&'s self, s: &'s thread::Scope<'s, '_>, producers: usize, consumers: usize) {
        for p in 0..producers {
            s.spawn(move || self.produce(p));
        }
        for _ in 0..consumers {
            s.spawn(move || self.consume());
        }
    }

    /// A connection, waiting while the server restarts; None once told to stop.
    fn reconnect(&self) -> Option<Client> {
        while !self.stop.load(Ordering::SeqCst) {
            if let Some(client) = try_connect() {
                return Some(client);
            }
            thread::sleep(Duration::from_millis(100));
        }
        None
    }

    fn produce(&self, producer: usize) {
        let mut seq = 0u64;
        let mut client = None;
        while !self.stop.load(Ordering::SeqCst) {
            let Some(c) = client.as_mut() else {
                client = self.reconnect();
                continue;
            };
            seq += 1;
            let keys: Vec<String> = (0..1 + seq % 3)
                .map(|n| format!("p{producer}-{seq}-{n}"))
                .collect();
            let roll_back = seq.is_multiple_of(5);
            match self.send_in_transaction(c, &keys, roll_back) {
                Ok(()) => {
                    let mut ledger = lock(&self.ledger);
                    let set = if roll_back {
                        &mut ledger.rolled_back
                    } else {
                        &mut ledger.committed
                    };
                    set.extend(keys);
                }
                Err(in_doubt) => {
                    let mut ledger = lock(&self.ledger);
                    let set = if in_doubt {
                        &mut ledger.commit_in_doubt
                    } else {
                        &mut ledger.rolled_back
                    };
                    set.extend(keys);
                    client = None;
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `keys` in one transaction and commits or rolls back. Err(true) when COMMIT got no
    /// answer, Err(false) when an error came before it.
    fn send_in_transaction(
        &self,
        c: &mut Client,
        keys: &[String],
        roll_back: bool,
    ) -> Result<(), bool> {
        let mut tx = c.transaction().map_err(|_| false)?;
        for key in keys {
            tx.execute(
                "SELECT bussig.send($1::text, jsonb_build_object('key', $2::text))",
                &[&self.queue, key],
            )
            .map_err(|_| false)?;
        }
        if roll_back {
            tx.rollback().map_err(|_| false)
        } else {
            tx.commit().map_err(|_| true)
        }
    }

    fn consume(&self) {
        let mut client = None;
        while !self.stop.load(Ordering::SeqCst) {
            let Some(c) = client.as_mut() else {
                client = self.reconnect();
                continue;
            };
            if self.consume_once(c).is_err() {
                client = None;
            }
        }
    }

    fn consume_once(&self, c: &mut Client) -> Result<(), postgres::Error> {
        let rows = c.query(
            "SELECT message_id, lock_token, payload ->> 'key' FROM bussig.read($1::text, 3, wait => '100 milliseconds')",
            &[&self.queue],
        )?;
        // Some work while holding the locks: slower than the producers, so that a backlog builds
        // up and a crash finds messages locked.
        thread::sleep(Duration::from_millis(30));
        for row in &rows {
            let (id, token, key): (i64, uuid::Uuid, String) = (row.get(0), row.get(1), row.get(2));
            lock(&self.ledger).delivered.insert(key.clone());
            let acked = c.query_one(
                "SELECT bussig.ack($1::text, $2::bigint, $3::uuid)",
                &[&self.queue, &id, &token],
            );
            match acked {
                Ok(row) => {
                    if row.get::<_, bool>(0) {
                        lock(&self.ledger).acked.insert(key);
                    }
                }
                Err(e) => {
                    lock(&self.ledger).ack_in_doubt.insert(key);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Every key whose COMMIT returned OK is acked or still present, nothing is present twice,
    /// nothing acked or rolled back is present. Then drains the queue and checks that exactly the
    /// present keys come out. Call after `stop` and the threads ended.
    fn check(&self, client: &mut Client) {
        let ledger = lock(&self.ledger);
        let dead_letters = format!("{}_dlq", self.queue);
        let rows = client
            .query(
                "SELECT m.payload ->> 'key', q.name = $2 FROM bussig.message m \
                 JOIN bussig.queue q USING (queue_id) WHERE q.name IN ($1, $2)",
                &[&self.queue, &dead_letters],
            )
            .expect("messages present");
        let present: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let queued: Vec<String> = rows
            .iter()
            .filter(|r| !r.get::<_, bool>(1))
            .map(|r| r.get(0))
            .collect();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for key in &present {
            *counts.entry(key).or_default() += 1;
        }
        let mut problems = Vec::new();
        for (key, n) in &counts {
            let key = key.to_string();
            if *n > 1 {
                problems.push(format!("{key} is present {n} times"));
            }
            if ledger.acked.contains(&key) {
                problems.push(format!("{key} is present though its ack committed"));
            }
            if ledger.rolled_back.contains(&key) {
                problems.push(format!(
                    "{key} is present though its transaction rolled back"
                ));
            } else if !ledger.committed.contains(&key) && !ledger.commit_in_doubt.contains(&key) {
                problems.push(format!("{key} is present though nobody sent it"));
            }
        }
        for key in &ledger.committed {
            if !counts.contains_key(key.as_str())
                && !ledger.acked.contains(key)
                && !ledger.ack_in_doubt.contains(key)
            {
                problems.push(format!("{key} was committed, never acked, and is gone"));
            }
        }
        for key in &ledger.delivered {
            if ledger.rolled_back.contains(key) {
                problems.push(format!("rolled-back {key} was delivered"));
            } else if !ledger.committed.contains(key) && !ledger.commit_in_doubt.contains(key) {
                problems.push(format!("{key} was delivered but never sent"));
            }
        }
        assert!(
            problems.is_empty(),
            "{} problems after recovery ({} committed, {} in doubt, {} acked, {} present), the first ones:\n{}",
            problems.len(),
            ledger.committed.len(),
            ledger.commit_in_doubt.len(),
            ledger.acked.len(),
            present.len(),
            problems.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
        eprintln!(
            "ledger: {} committed, {} commits in doubt, {} rolled back, {} acked, {} acks in doubt, {} present",
            ledger.committed.len(),
            ledger.commit_in_doubt.len(),
            ledger.rolled_back.len(),
            ledger.acked.len(),
            ledger.ack_in_doubt.len(),
            present.len()
        );

        // Nothing is stuck: every message present is delivered once its lock (if a consumer held
        // one at the crash) runs out.
        let mut drained = Vec::new();
        eventually(
            Duration::from_secs(30),
            "the queue to drain after recovery",
            || {
                for d in read(client, &self.queue, 100, None) {
                    assert!(
                        ack(client, &self.queue, d.id, d.token),
                        "ack while draining"
                    );
                    drained.push(d.payload["key"].as_str().expect("key").to_string());
                }
                (peek(client, &self.queue).is_empty()).then_some(())
            },
        );
        drained.sort();
        let mut expected = queued;
        expected.sort();
        assert_eq!(
            drained, expected,
            "what the drain delivered is not what was queued"
        );
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn consumer_backend_killed_in_a_long_poll() {
    let _serial = lock(&SERVER);
    let mut client = connect();
    let load_queue = Queue::create(
        &mut client,
        "crash_kill_load",
        "lock_timeout => '2 seconds'",
    );
    let victim_queue = Queue::create(&mut client, "crash_kill_victim", "");
    let idle_queue = Queue::create(&mut client, "crash_kill_idle", "");
    let _server = ServerGuard::new(&mut client);
    let victim_id = send(&mut client, &victim_queue.name, &json!({ "key": "victim" }));

    let load = Load::new(&load_queue.name);
    thread::scope(|s| {
        let _stop = StopLoad(&load);
        load.run(s, 2, 2);
        thread::sleep(Duration::from_secs(2));

        // The victim locks a message for ten minutes and, in the same transaction, long-polls
        // an empty queue. Its transaction never commits: the lock must be gone after the crash.
        let mut victim = connect();
        let victim_pid = backend_pid(&mut victim);
        let (victim_name, idle_name) = (victim_queue.name.clone(), idle_queue.name.clone());
        let victim_thread = thread::spawn(move || {
            let mut tx = victim.transaction().expect("begin");
            let held = read(&mut tx, &victim_name, 1, Some("10 minutes"));
            assert_eq!(held.len(), 1, "the victim's message");
            tx.query(
                "SELECT * FROM bussig.read($1::text, 1, wait => '60 seconds')",
                &[&idle_name],
            )
            .expect_err("the long poll must end with the backend's death")
        });
        wait_until_waiting(&mut client, &[victim_pid]);
        let started = Instant::now();
        kill_9(victim_pid);
        let err = victim_thread.join().expect("victim thread");
        eprintln!("victim's read ended with: {err}");

        wait_until_disconnected(&mut client);
        client = connect_after_restart();
        eprintln!(
            "the server accepts connections {:?} after the kill",
            started.elapsed()
        );

        // Let the load go on for a while after recovery, then stop it.
        thread::sleep(Duration::from_secs(2));
    });

    let again = read(&mut client, &victim_queue.name, 1, None);
    assert_eq!(
        again
            .iter()
            .map(|d| (d.id, d.delivery_count))
            .collect::<Vec<_>>(),
        vec![(victim_id, 1)],
        "the killed backend's lock outlived it, or its read counted as a delivery"
    );
    assert!(ack(
        &mut client,
        &victim_queue.name,
        victim_id,
        again[0].token
    ));
    load.check(&mut client);
}

#[test]
fn immediate_stop_under_load_loses_nothing_committed() {
    let _serial = lock(&SERVER);
    let mut client = connect();
    let queue = Queue::create(
        &mut client,
        "crash_immediate",
        "lock_timeout => '2 seconds'",
    );
    let _server = ServerGuard::new(&mut client);
    drop(client);

    let load = Load::new(&queue.name);
    thread::scope(|s| {
        let _stop = StopLoad(&load);
        load.run(s, 3, 2);
        thread::sleep(Duration::from_secs(3));
        let took = stop_server("immediate");
        eprintln!("pg_ctl stop -m immediate took {took:?}");
        // The load keeps trying while the server is down.
        thread::sleep(Duration::from_millis(500));
        start_server();
        drop(connect_after_restart());
        thread::sleep(Duration::from_secs(2));
    });

    let mut client = connect_after_restart();
    let ledger = lock(&load.ledger);
    assert!(
        ledger.committed.len() > 50 && !ledger.acked.is_empty(),
        "too little load to prove anything: {} committed, {} acked",
        ledger.committed.len(),
        ledger.acked.len()
    );
    drop(ledger);
    load.check(&mut client);
}

/// How many times each way of ending a wait is tried: more than the 1024 wait slots, so a leak of
/// one slot per ended wait would use them all up.
const ENDED_WAITS: usize = 1100;
/// Readers waiting at once (max_connections is 100).
const READERS: usize = 50;

/// Proves the wait slots are free: a waiting reader is woken by a commit within 100 ms, and sleeps
/// in between. A reader that finds no free slot polls every 50 ms instead, reading the message table
/// each time (three index probes a read, 60 in a second); one with a slot reads it a few times in
/// all (9 scans for a read, its look for the next ready time, and its read when the wait ends).
fn assert_waits_still_work(client: &mut Client, queue: &str) {
    let mut reader = connect();
    let mut tx = reader.transaction().unwrap();
    let got = tx
        .query(
            "SELECT * FROM bussig.read($1::text, 1, wait => '1 second')",
            &[&queue],
        )
        .unwrap();
    assert!(got.is_empty(), "nothing was sent, got {} rows", got.len());
    let scans: i64 = tx
        .query_one(
            "SELECT coalesce(sum(seq_scan + idx_scan), 0)::bigint FROM pg_stat_xact_user_tables \
             WHERE relid = 'bussig.message'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    assert!(
        scans < 20,
        "a 1 s wait scanned the message table {scans} times: it polled, so no wait slot was free"
    );

    let pid = backend_pid(&mut reader);
    let waiting = spawn_waiting_read(reader, queue, "10 seconds");
    wait_until_waiting(client, &[pid]);
    send(client, queue, &json!({ "wake": "up" }));
    let committed = Instant::now();
    let (result, mut reader) = waiting.join().expect("reader thread");
    let latency = committed.elapsed();
    assert_eq!(
        result.expect("read"),
        1,
        "the waiting reader got the message"
    );
    assert!(
        latency < Duration::from_millis(100),
        "woken {latency:?} after the commit"
    );
    // Leave the queue empty for the next round.
    reader
        .execute("SELECT bussig.purge_queue($1::text)", &[&queue])
        .unwrap();
}

#[test]
fn terminated_waits_leave_no_stuck_slots() {
    let _serial = lock(&SERVER);
    let mut client = connect();
    let queue = Queue::create(&mut client, "crash_terminate", "");
    let _server = ServerGuard::new(&mut client);
    assert_waits_still_work(&mut client, &queue.name);

    let mut ended = 0;
    while ended < ENDED_WAITS {
        let mut pids = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..READERS {
            let mut reader = connect();
            pids.push(backend_pid(&mut reader));
            threads.push(spawn_waiting_read(reader, &queue.name, "30 seconds"));
        }
        wait_until_waiting(&mut client, &pids);
        let terminated: i64 = client
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM unnest($1::int[]) pid",
                &[&pids],
            )
            .unwrap()
            .get(0);
        assert_eq!(terminated, READERS as i64, "pg_terminate_backend");
        for t in threads {
            let (result, _) = t.join().expect("reader thread");
            let err = result.expect_err("a terminated wait must fail");
            assert!(
                err.code() == Some(&SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
                "{err}"
            );
        }
        ended += READERS;
    }
    assert_waits_still_work(&mut client, &queue.name);
}

#[test]
fn canceled_and_timed_out_waits_leave_no_stuck_slots() {
    let _serial = lock(&SERVER);
    let mut client = connect();
    let queue = Queue::create(&mut client, "crash_cancel", "");
    let _server = ServerGuard::new(&mut client);
    let q = queue.name.as_str();

    // pg_cancel_backend, READERS at a time on the same connections.
    let mut readers: Vec<Client> = (0..READERS).map(|_| connect()).collect();
    let pids: Vec<i32> = readers.iter_mut().map(backend_pid).collect();
    for _ in 0..ENDED_WAITS.div_ceil(READERS) {
        let threads: Vec<_> = readers
            .drain(..)
            .map(|r| spawn_waiting_read(r, q, "30 seconds"))
            .collect();
        wait_until_waiting(&mut client, &pids);
        client
            .execute(
                "SELECT pg_cancel_backend(pid) FROM unnest($1::int[]) pid",
                &[&pids],
            )
            .unwrap();
        for t in threads {
            let (result, reader) = t.join().expect("reader thread");
            let err = result.expect_err("a canceled wait must fail");
            assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
            readers.push(reader);
        }
    }
    // The reader threads come back in order, so pids still match.
    assert_waits_still_work(&mut client, q);

    // statement_timeout, on as many connections at once.
    thread::scope(|s| {
        for mut reader in readers.drain(..) {
            s.spawn(move || {
                reader
                    .batch_execute("SET statement_timeout = '20ms'")
                    .unwrap();
                for _ in 0..ENDED_WAITS.div_ceil(READERS) {
                    let err = reader
                        .query(
                            "SELECT * FROM bussig.read($1::text, 1, wait => '30 seconds')",
                            &[&q],
                        )
                        .expect_err("statement_timeout must end the wait");
                    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
                }
            });
        }
    });
    assert_waits_still_work(&mut client, q);
}

#[test]
fn fast_shutdown_is_not_held_up_by_waiting_readers() {
    let _serial = lock(&SERVER);
    let mut client = connect();
    let queue = Queue::create(&mut client, "crash_shutdown", "");
    let _server = ServerGuard::new(&mut client);

    let mut pids = Vec::new();
    let mut threads = Vec::new();
    for _ in 0..5 {
        let mut reader = connect();
        pids.push(backend_pid(&mut reader));
        threads.push(spawn_waiting_read(reader, &queue.name, "5 minutes"));
    }
    wait_until_waiting(&mut client, &pids);
    drop(client);

    let took = stop_server("fast");
    eprintln!("pg_ctl stop -m fast took {took:?} with 5 readers waiting");
    assert!(
        took < Duration::from_secs(30),
        "a fast shutdown waited {took:?} for the readers"
    );
    for t in threads {
        let (result, _) = t.join().expect("reader thread");
        let err = result.expect_err("the shutdown must end the wait");
        assert!(
            err.code() == Some(&SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
            "{err}"
        );
    }

    start_server();
    let mut client = connect_after_restart();
    assert_waits_still_work(&mut client, &queue.name);
}
