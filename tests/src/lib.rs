//! Shared helpers for bussig's client-level integration tests.
//!
//! Every test opens its own connections and its own uniquely named queues,
//! because the tests of one binary run in parallel threads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod session;
mod stream;

use postgres::fallible_iterator::FallibleIterator;
pub use postgres::NoTls;
use serde_json::Value;
pub use session::{Client, GenericClient, Param, Transaction, Typed};
pub use stream::{
    append_numbers, commit_all, create_group, stream_read, stream_visits, total_lag, Record, Stream,
};
use uuid::Uuid;

pub use postgres::error::SqlState;
pub use serde_json::json;

/// Opens a connection to the database named by `BUSSIG_TEST_URL` (directly, or through a
/// transaction-pooling proxy when `make test` runs the suite a second time that way).
pub fn connect() -> Client {
    let url =
        std::env::var("BUSSIG_TEST_URL").expect("BUSSIG_TEST_URL is not set: run `make test`");
    connect_to(&url)
}

/// A connection of its own to the server, never through a pooling proxy: for LISTEN, which only a
/// session can do. `BUSSIG_TEST_SESSION_URL`, else `BUSSIG_TEST_URL`.
pub fn connect_session() -> Client {
    match std::env::var("BUSSIG_TEST_SESSION_URL") {
        Ok(url) => connect_to(&url),
        Err(_) => connect(),
    }
}

fn connect_to(url: &str) -> Client {
    let mut client = Client::connect(url, NoTls)
        .unwrap_or_else(|e| panic!("cannot connect to BUSSIG_TEST_URL ({url}): {e}"));
    // A hung statement should fail the test, not the whole run.
    client
        .batch_execute("SET statement_timeout = '30s'")
        .expect("set statement_timeout");
    client
}

/// A queue name no other test (or earlier run) uses: `<test>_<pid>_<clock>_<n>`.
/// Kept to at most 56 characters so `<name>_dlq` still fits in 60.
pub fn unique_name(test: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs()
        % 0x10_0000;
    let test: String = test.chars().take(30).collect();
    format!("{test}_{}_{clock:x}_{n}", std::process::id())
}

/// A queue created for one test and dropped (with its `_dlq`) when it goes
/// out of scope, even if the test panics.
pub struct Queue {
    pub name: String,
}

impl Queue {
    /// Creates a fresh queue; `options` are extra named arguments for
    /// `bussig.create_queue`, e.g. `"max_deliveries => 3"` (or `""`).
    pub fn create(client: &mut Client, test: &str, options: &str) -> Queue {
        let name = unique_name(test);
        let sep = if options.is_empty() { "" } else { ", " };
        let sql = format!("SELECT bussig.create_queue($1::text{sep}{options})");
        let created: bool = client.query_one(&sql, &[&name]).expect(&sql).get(0);
        assert!(
            created,
            "create_queue({name}) returned false for a new name"
        );
        Queue { name }
    }

    /// The queue's id: what its messages keep once a drop has removed its name.
    pub fn id(&self, client: &mut Client) -> i32 {
        client
            .query_one(
                "SELECT queue_id FROM bussig.queue WHERE name = $1::text",
                &[&self.name],
            )
            .unwrap()
            .get(0)
    }

    /// The dead-letter queue every queue gets by default.
    pub fn dlq(&self) -> String {
        format!("{}_dlq", self.name)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // Best effort: a failing test must still report its own panic.
        let Ok(url) = std::env::var("BUSSIG_TEST_URL") else {
            return;
        };
        let Ok(mut client) = Client::connect(&url, NoTls) else {
            return;
        };
        let _ = client.batch_execute("SET lock_timeout = '10s'");
        let _ = client.execute("SELECT bussig.drop_queue($1::text)", &[&self.name]);
    }
}

/// Calls `check` every 50 ms until it returns `Some`, panicking after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A session (`connect_session`) and the process id of its backend, to watch it from another
/// connection: through a pooler, a connection's backend changes from one transaction to the next.
pub fn watched_session() -> (Client, i32) {
    let mut session = connect_session();
    let pid = session
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    (session, pid)
}

/// Waits until the backend `pid` waits for a lock. Watched by pid, not by its statement's text: a
/// test running beside it may wait in the same function.
pub fn blocked_on_a_lock(watcher: &mut Client, pid: i32, what: &str) {
    eventually(
        Duration::from_secs(20),
        &format!("{what} waiting for a lock"),
        || {
            let waiting: bool = watcher
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock')",
                &[&pid],
            )
            .unwrap()
            .get(0);
            waiting.then_some(())
        },
    );
}

/// One row of `bussig.read`.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: i64,
    pub token: Uuid,
    pub payload: Value,
    pub headers: Option<Value>,
    pub delivery_count: i32,
    pub priority: i32,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
}

/// `bussig.read(queue, max, lock_timeout)`; `lock_timeout` is interval text
/// such as `"1 second"`, or `None` for the queue's own.
pub fn read(
    c: &mut impl GenericClient,
    queue: &str,
    max: i32,
    lock_timeout: Option<&str>,
) -> Vec<Delivery> {
    let sql = "SELECT message_id, lock_token, payload, headers, delivery_count, priority, \
                      correlation_id, reply_to \
               FROM bussig.read($1::text, $2::int, $3::text::interval)";
    c.query(sql, &[&queue, &max, &lock_timeout])
        .unwrap_or_else(|e| panic!("read({queue}): {e}"))
        .iter()
        .map(|r| Delivery {
            id: r.get(0),
            token: r.get(1),
            payload: r.get(2),
            headers: r.get(3),
            delivery_count: r.get(4),
            priority: r.get(5),
            correlation_id: r.get(6),
            reply_to: r.get(7),
        })
        .collect()
}

/// Reads at most one message with the queue's lock timeout.
pub fn read_one(c: &mut impl GenericClient, queue: &str) -> Option<Delivery> {
    read(c, queue, 1, None).pop()
}

/// One row of `bussig.peek`.
#[derive(Debug, Clone)]
pub struct Peeked {
    pub id: i64,
    pub state: String,
    pub payload: Value,
    pub headers: Option<Value>,
    pub delivery_count: i32,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
}

/// `bussig.peek(queue, 100)`: what is in the queue, without locking anything.
pub fn peek(c: &mut impl GenericClient, queue: &str) -> Vec<Peeked> {
    let sql =
        "SELECT message_id, state, payload, headers, delivery_count, correlation_id, reply_to \
               FROM bussig.peek($1::text, 100)";
    c.query(sql, &[&queue])
        .unwrap_or_else(|e| panic!("peek({queue}): {e}"))
        .iter()
        .map(|r| Peeked {
            id: r.get(0),
            state: r.get(1),
            payload: r.get(2),
            headers: r.get(3),
            delivery_count: r.get(4),
            correlation_id: r.get(5),
            reply_to: r.get(6),
        })
        .collect()
}

/// `bussig.send(queue, payload)` with every option at its default.
pub fn send(c: &mut impl GenericClient, queue: &str, payload: &Value) -> i64 {
    c.query_one(
        "SELECT bussig.send($1::text, $2::jsonb)",
        &[&queue, payload],
    )
    .unwrap_or_else(|e| panic!("send({queue}): {e}"))
    .get::<_, Option<i64>>(0)
    .expect("send without dedup_id returned NULL")
}

/// `bussig.send_batch(queue, payloads)`: the new ids.
pub fn send_batch(c: &mut impl GenericClient, queue: &str, payloads: &[Value]) -> Vec<i64> {
    c.query(
        "SELECT bussig.send_batch($1::text, $2::jsonb[])",
        &[&queue, &payloads],
    )
    .unwrap_or_else(|e| panic!("send_batch({queue}): {e}"))
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Live rows of `bussig.message` read so far in this transaction, and pages read, over the table and
/// its indexes.
pub fn message_visits(c: &mut impl GenericClient) -> (i64, i64) {
    let row = c
        .query_one(
            "SELECT (pg_stat_get_xact_tuples_returned('bussig.message'::regclass)
                     + pg_stat_get_xact_tuples_fetched('bussig.message'::regclass)
                     + sum(pg_stat_get_xact_tuples_fetched(i.indexrelid)))::bigint,
                    (pg_stat_get_xact_blocks_fetched('bussig.message'::regclass)
                     + sum(pg_stat_get_xact_blocks_fetched(i.indexrelid)))::bigint
             FROM pg_index i WHERE i.indrelid = 'bussig.message'::regclass",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// `bussig.ack_batch(queue, ids, tokens)` of `deliveries`: how many it acked.
pub fn ack_batch(c: &mut impl GenericClient, queue: &str, deliveries: &[Delivery]) -> i64 {
    let ids: Vec<i64> = deliveries.iter().map(|d| d.id).collect();
    let tokens: Vec<Uuid> = deliveries.iter().map(|d| d.token).collect();
    c.query_one(
        "SELECT bussig.ack_batch($1::text, $2::bigint[], $3::uuid[])",
        &[&queue, &ids, &tokens],
    )
    .unwrap_or_else(|e| panic!("ack_batch({queue}): {e}"))
    .get(0)
}

/// `bussig.ack(queue, id, token)`.
pub fn ack(c: &mut impl GenericClient, queue: &str, id: i64, token: Uuid) -> bool {
    c.query_one(
        "SELECT bussig.ack($1::text, $2::bigint, $3::uuid)",
        &[&queue, &id, &token],
    )
    .unwrap_or_else(|e| panic!("ack({queue}, {id}): {e}"))
    .get(0)
}

/// `(ready, delayed, locked)` from the `bussig.queues` view, once the worker's steps have run (the
/// split is the worker's count; `c` must be the extension owner).
pub fn counts(c: &mut impl GenericClient, queue: &str) -> (i64, i64, i64) {
    c.execute("SELECT bussig.run_maintenance()", &[])
        .unwrap_or_else(|e| panic!("run_maintenance before counting {queue}: {e:?}"));
    let sql = "SELECT ready::bigint, delayed::bigint, locked::bigint \
               FROM bussig.queues WHERE queue = $1::text";
    let row = c
        .query_one(sql, &[&queue])
        .unwrap_or_else(|e| panic!("bussig.queues row for {queue}: {e}"));
    (row.get(0), row.get(1), row.get(2))
}

/// A string header, if present.
pub fn header<'a>(headers: &'a Option<Value>, key: &str) -> Option<&'a str> {
    headers.as_ref()?.get(key)?.as_str()
}

/// PostgreSQL's client programs; `make test` uses the system PostgreSQL 15.
pub fn pg_program(name: &str) -> String {
    let bin =
        std::env::var("BUSSIG_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    format!("{bin}/{name}")
}

/// BUSSIG_TEST_URL pointed at another database (a later key wins in a libpq connection string).
pub fn url_for(database: &str) -> String {
    let url =
        std::env::var("BUSSIG_TEST_URL").expect("BUSSIG_TEST_URL is not set: run `make test`");
    format!("{url} dbname={database}")
}

/// The same, never through a pooling proxy: for pg_dump and pg_restore, which need a session.
pub fn session_url_for(database: &str) -> String {
    match std::env::var("BUSSIG_TEST_SESSION_URL") {
        Ok(url) => format!("{url} dbname={database}"),
        Err(_) => url_for(database),
    }
}

/// Runs one of PostgreSQL's client programs and fails the test when it fails.
pub fn run_program(program: &str, args: &[&str]) {
    let output = std::process::Command::new(pg_program(program))
        .args(args)
        .output()
        .expect(program);
    assert!(
        output.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A database of its own for one test, dropped (with FORCE: the worker may be connected) at the end.
pub struct Database {
    pub name: String,
}

impl Database {
    pub fn create(test: &str) -> Database {
        let name = unique_name(test);
        connect()
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .expect("create database");
        Database { name }
    }

    pub fn connect(&self) -> Client {
        Client::connect(&url_for(&self.name), NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to database {}: {e}", self.name))
    }

    /// A database of its own with the extension, its worker kept out for as long as the returned
    /// session lives (see `keep_worker_out`): for tests that run the worker's steps themselves.
    pub fn without_worker(test: &str) -> (Database, Client) {
        let database = Database::create(test);
        let mut admin = database.connect();
        admin.batch_execute("CREATE EXTENSION bussig").unwrap();
        keep_worker_out(&mut admin);
        (database, admin)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        clean_up(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ));
    }
}

/// A login role of its own for one test, dropped at the end.
pub struct Role {
    pub name: String,
}

impl Role {
    pub fn create(test: &str) -> Role {
        let name = unique_name(test);
        connect()
            .batch_execute(&format!("CREATE ROLE \"{name}\" LOGIN"))
            .expect("create role");
        Role { name }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        clean_up(&format!("DROP ROLE IF EXISTS \"{}\"", self.name));
    }
}

/// Runs a clean-up statement from a Drop: a failure is reported, never a second panic.
fn clean_up(sql: &str) {
    if let Err(e) = connect().batch_execute(sql) {
        eprintln!("{sql}: {e}");
    }
}

/// The advisory lock key with which the worker claims its database (see src/worker/mod.rs).
const WORKER_LOCK_KEY: i64 = 0x6275_7373_6967;

/// Ends the worker of `admin`'s database and keeps the next one out, for as long as `admin`'s session
/// lives: for tests that run the worker's steps themselves, or measure what its transactions would
/// disturb.
pub fn keep_worker_out(admin: &mut Client) {
    eventually(
        Duration::from_secs(30),
        "the worker's claim on this database",
        || {
            admin
                .batch_execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND backend_type = 'bussig worker'",
                )
                .unwrap();
            let claimed: bool = admin
                .query_one("SELECT pg_try_advisory_lock($1)", &[&WORKER_LOCK_KEY])
                .unwrap()
                .get(0);
            claimed.then_some(())
        },
    );
}

/// A small deterministic source of choices (xorshift): tests need variety, not quality, and a seed
/// to replay a failure with.
pub struct Dice(pub u64);

impl Dice {
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Collects notifications on `channel` until `count` arrived (deadline 10 s),
/// then for another `quiet` to catch any extra one.
pub fn collect_notifications(
    listener: &mut Client,
    channel: &str,
    count: usize,
    quiet: Duration,
) -> Vec<postgres::Notification> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out waiting for {count} notifications on {channel}, got {}",
            got.len()
        );
        let mut notes = listener.session().notifications();
        let mut iter = notes.timeout_iter(left);
        match iter.next().expect("notification stream") {
            Some(n) => got.push(n),
            None => continue,
        }
    }
    let mut notes = listener.session().notifications();
    let mut iter = notes.timeout_iter(quiet);
    while let Some(n) = iter.next().expect("notification stream") {
        got.push(n);
    }
    got.retain(|n| n.channel() == channel);
    got
}
