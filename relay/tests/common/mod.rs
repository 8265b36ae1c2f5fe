//! Shared pieces of the relay's integration tests: a throw-away nats-server with JetStream, bussig
//! queues in the database `BUSSIG_TEST_URL` names, the relay binary as a child process, and checks
//! of what ended up in the stream.
//!
//! Every test starts its own nats-server and relays, and names its queues uniquely, because the
//! tests of one binary run in parallel threads.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, stream};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, NoTls};

#[allow(unused_imports)]
pub use serde_json::json;

/// Calls `check` every 50 ms until it returns `Some`, panicking after `timeout`.
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unique_suffix() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_nanos()
        % 0x1000_0000;
    format!("{}_{clock:x}_{n}", std::process::id())
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("bussig-relay-{what}-{}", unique_suffix()));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

pub fn database_url() -> String {
    std::env::var("BUSSIG_TEST_URL").expect("BUSSIG_TEST_URL is not set: run `make test`")
}

pub async fn connect() -> Client {
    let url = database_url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to BUSSIG_TEST_URL ({url}): {e}"));
    tokio::spawn(connection);
    client
        .batch_execute("SET statement_timeout = '30s'")
        .await
        .expect("set statement_timeout");
    client
}

/// A bussig queue for one test, dropped with its `_dlq` when it goes out of scope.
pub struct Queue {
    pub name: String,
}

impl Queue {
    /// `options` are extra named arguments of `bussig.create_queue`, e.g. `"max_deliveries => 3"`.
    pub async fn create(db: &Client, test: &str, options: &str) -> Queue {
        let test: String = test.chars().take(24).collect();
        let name = format!("{test}_{}", unique_suffix());
        let sep = if options.is_empty() { "" } else { ", " };
        let sql = format!("SELECT bussig.create_queue($1::text{sep}{options})");
        let created: bool = db.query_one(&sql, &[&name]).await.expect(&sql).get(0);
        assert!(
            created,
            "create_queue({name}) returned false for a new name"
        );
        Queue { name }
    }

    pub fn dlq(&self) -> String {
        format!("{}_dlq", self.name)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime: use a thread with a runtime of its own.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&database_url(), NoTls).await.ok()?;
                tokio::spawn(connection);
                let _ = client.batch_execute("SET lock_timeout = '10s'").await;
                client
                    .execute("SELECT bussig.drop_queue($1::text)", &[&name])
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// Sends one message per committed transaction; returns the ids in sending order.
pub async fn send_each(
    db: &Client,
    queue: &str,
    payloads: impl IntoIterator<Item = Value>,
) -> Vec<i64> {
    let mut ids = Vec::new();
    for payload in payloads {
        let row = db
            .query_one(
                "SELECT bussig.send($1::text, $2::jsonb)",
                &[&queue, &payload],
            )
            .await
            .unwrap_or_else(|e| panic!("send({queue}): {e}"));
        ids.push(row.get(0));
    }
    ids
}

/// Sends all payloads in one committed transaction.
pub async fn send_batch(db: &Client, queue: &str, payloads: &[Value]) -> Vec<i64> {
    db.query(
        "SELECT bussig.send_batch($1::text, $2::jsonb[])",
        &[&queue, &payloads],
    )
    .await
    .unwrap_or_else(|e| panic!("send_batch({queue}): {e}"))
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// `(ready, delayed, locked)` of a queue.
pub async fn counts(db: &Client, queue: &str) -> (i64, i64, i64) {
    let row = db
        .query_one(
            "SELECT ready::bigint, delayed::bigint, locked::bigint FROM bussig.queues WHERE queue = $1::text",
            &[&queue],
        )
        .await
        .unwrap_or_else(|e| panic!("bussig.queues row for {queue}: {e}"));
    (row.get(0), row.get(1), row.get(2))
}

/// Messages in a queue, whatever their state.
pub async fn total(db: &Client, queue: &str) -> i64 {
    let (ready, delayed, locked) = counts(db, queue).await;
    ready + delayed + locked
}

/// `(message_id, headers)` of what a queue holds, e.g. a dead-letter queue.
pub async fn peek(db: &Client, queue: &str) -> Vec<(i64, Value, Option<Value>)> {
    db.query(
        "SELECT message_id, payload, headers FROM bussig.peek($1::text, 1000)",
        &[&queue],
    )
    .await
    .unwrap_or_else(|e| panic!("peek({queue}): {e}"))
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// `NATS_SERVER` names the binary when it is not `nats-server` on the PATH.
fn nats_server_binary() -> String {
    std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".to_string())
}

/// A nats-server with JetStream on a free port, storing in a temp dir; killed when dropped.
pub struct Nats {
    pub port: u16,
    store: TempDir,
    child: Option<Child>,
}

impl Nats {
    pub async fn start() -> Nats {
        let mut nats = Nats {
            port: free_port(),
            store: TempDir::new("nats"),
            child: None,
        };
        nats.restart().await;
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port and store, and waits until it takes clients.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let log = fs::File::create(self.store.0.join("server.log")).expect("nats log file");
        let child = Command::new(nats_server_binary())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.0.join("jetstream"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server (apt-get install nats-server)");
        self.child = Some(child);
        let url = self.url();
        eventually(
            Duration::from_secs(20),
            "nats-server to take clients",
            async || {
                let client = async_nats::connect(url.as_str()).await.ok()?;
                let reply = client
                    .request("$JS.API.INFO", Vec::new().into())
                    .await
                    .ok()?;
                let info: Value = serde_json::from_slice(&reply.payload).ok()?;
                info.get("error").is_none().then_some(())
            },
        )
        .await;
    }

    /// Stops the server the way an operator does (SIGTERM), so JetStream flushes its store.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("nats-server is running");
        signal(child.id(), "TERM");
        eventually(Duration::from_secs(20), "nats-server to exit", async || {
            child.try_wait().expect("wait for nats-server").map(|_| ())
        })
        .await;
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        let client = async_nats::connect(self.url().as_str())
            .await
            .expect("connect to nats-server");
        jetstream::new(client)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A stream capturing `subjects`, with a two-minute duplicate window.
pub async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &[&str],
    max_message_size: i32,
) {
    js.create_stream(stream::Config {
        name: name.to_string(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        duplicate_window: Duration::from_secs(120),
        max_message_size,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create stream {name}: {e}"));
}

/// One message as the stream holds it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub sequence: u64,
    pub subject: String,
    pub headers: HashMap<String, String>,
    pub payload: Value,
}

impl Stored {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn message_id(&self) -> i64 {
        self.header("Bussig-Message-Id")
            .expect("every relayed message has Bussig-Message-Id")
            .parse()
            .expect("Bussig-Message-Id is a number")
    }
}

/// Everything in the stream, in stream order.
pub async fn stream_messages(js: &jetstream::Context, name: &str) -> Vec<Stored> {
    let mut stream = js.get_stream(name).await.expect("get stream");
    let state = stream.info().await.expect("stream info").state.clone();
    let mut messages = Vec::new();
    if state.messages == 0 {
        return messages;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let raw = stream
            .get_raw_message(sequence)
            .await
            .expect("get stream message");
        let headers = raw
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.first()
                        .map(|v| v.as_str().to_string())
                        .unwrap_or_default(),
                )
            })
            .collect();
        messages.push(Stored {
            sequence,
            subject: raw.subject.to_string(),
            headers,
            payload: serde_json::from_slice(&raw.payload).expect("payload is JSON"),
        });
    }
    messages
}

pub async fn stream_count(js: &jetstream::Context, name: &str) -> u64 {
    let mut stream = js.get_stream(name).await.expect("get stream");
    stream.info().await.expect("stream info").state.messages
}

/// The messages of `queue` in the stream; panics unless each of `expected` is there exactly once
/// and nothing else is, and, when `ordered`, in the order of `expected`.
pub fn assert_exactly_once(
    stored: &[Stored],
    queue: &str,
    expected: &[i64],
    ordered: bool,
) -> Vec<Stored> {
    let mine: Vec<Stored> = stored
        .iter()
        .filter(|m| m.header("Bussig-Queue") == Some(queue))
        .cloned()
        .collect();
    let ids: Vec<i64> = mine.iter().map(Stored::message_id).collect();
    let mut seen = HashSet::new();
    let duplicates: Vec<i64> = ids.iter().copied().filter(|id| !seen.insert(*id)).collect();
    assert!(
        duplicates.is_empty(),
        "{queue}: stored more than once: {duplicates:?}"
    );
    let expected_set: HashSet<i64> = expected.iter().copied().collect();
    let missing: Vec<i64> = expected
        .iter()
        .copied()
        .filter(|id| !seen.contains(id))
        .collect();
    let extra: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| !expected_set.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{queue}: {} never stored: {missing:?}",
        missing.len()
    );
    assert!(
        extra.is_empty(),
        "{queue}: stored but never committed: {extra:?}"
    );
    if ordered {
        assert_eq!(
            ids, expected,
            "{queue}: stream order differs from sending order"
        );
    }
    for message in &mine {
        assert_eq!(
            message.header("Nats-Msg-Id"),
            Some(format!("{queue}:{}", message.message_id()).as_str()),
            "Nats-Msg-Id names queue and message"
        );
    }
    mine
}

/// Waits until the queue is empty and the stream holds `count` messages of it.
pub async fn wait_relayed(
    db: &Client,
    js: &jetstream::Context,
    stream: &str,
    queue: &str,
    count: usize,
    timeout: Duration,
) {
    eventually(
        timeout,
        &format!("{count} messages of {queue} in stream {stream}"),
        async || {
            if total(db, queue).await != 0 {
                return None;
            }
            let stored = stream_messages(js, stream).await;
            let mine = stored
                .iter()
                .filter(|m| m.header("Bussig-Queue") == Some(queue))
                .count();
            (mine >= count).then_some(())
        },
    )
    .await;
}

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// `GET path` on the relay's HTTP port: `(status code, body)`, or None when it does not answer.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .ok()?
    .ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// The value of one metric series (`name{labels}`) in a `/metrics` body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A relay process with its own config file and log; killed when dropped.
pub struct Relay {
    pub metrics_port: u16,
    database_url: String,
    dir: TempDir,
    child: Option<Child>,
}

impl Relay {
    /// Writes `config` (TOML without database_url, nats_url or metrics_address: those come from
    /// the environment, as in production) and starts the relay without waiting for it.
    pub fn spawn(nats_url: &str, config: &str) -> Relay {
        Relay::spawn_on(&database_url(), nats_url, config)
    }

    /// As `spawn`, with another connection string, e.g. one naming the session.
    pub fn spawn_on(database_url: &str, nats_url: &str, config: &str) -> Relay {
        let dir = TempDir::new("relay");
        let mut relay = Relay {
            metrics_port: free_port(),
            database_url: database_url.to_string(),
            dir,
            child: None,
        };
        fs::write(relay.config_path(), config).expect("write relay config");
        relay.start(nats_url);
        relay
    }

    /// Starts the relay and waits until `/ready` says yes.
    pub async fn start_ready(nats_url: &str, config: &str) -> Relay {
        let relay = Relay::spawn(nats_url, config);
        relay.wait_ready().await;
        relay
    }

    fn config_path(&self) -> PathBuf {
        self.dir.0.join("relay.toml")
    }

    /// Starts (again) the same configuration, appending to the same log.
    pub fn start(&mut self, nats_url: &str) {
        assert!(self.child.is_none(), "relay is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.0.join("relay.log"))
            .expect("relay log");
        let child = Command::new(env!("CARGO_BIN_EXE_bussig-relay"))
            .arg("--config")
            .arg(self.config_path())
            .env("DATABASE_URL", &self.database_url)
            .env("NATS_URL", nats_url)
            .env(
                "BUSSIG_RELAY_METRICS_ADDRESS",
                format!("127.0.0.1:{}", self.metrics_port),
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start bussig-relay");
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.0.join("relay.log")).unwrap_or_default()
    }

    pub async fn wait_ready(&self) {
        let port = self.metrics_port;
        let ready = tokio::time::timeout(
            Duration::from_secs(30),
            eventually(Duration::from_secs(30), "relay /ready", async || {
                matches!(http_get(port, "/ready").await, Some((200, _))).then_some(())
            }),
        )
        .await;
        assert!(
            ready.is_ok(),
            "relay never became ready; its log:\n{}",
            self.log()
        );
    }

    pub async fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("relay is running").id()
    }

    /// SIGKILL: no chance to release anything.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("relay is running");
        child.kill().expect("SIGKILL the relay");
        child.wait().expect("reap the relay");
    }

    /// Sends SIGTERM and returns the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        signal(self.pid(), "TERM");
        self.wait_exit(Duration::from_secs(30)).await
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("relay is running");
        let status = eventually(timeout, "the relay to exit", async || {
            child.try_wait().expect("wait")
        })
        .await;
        self.child = None;
        status
    }

    /// Panics unless the process is still running (it did not crash).
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("relay was started");
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("relay exited with {status}; its log:\n{}", self.log());
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- relay log ----\n{}", self.log());
        }
    }
}

/// One route's TOML, for a relay config.
pub fn route(queue: &str, subject: &str, extra: &str) -> String {
    format!("[[route]]\nqueue = \"{queue}\"\nsubject = \"{subject}\"\n{extra}\n")
}

/// The settings every test relay shares: short timeouts so faults heal within the test.
pub const FAST: &str = "log_format = \"text\"\nack_timeout = \"1s\"\nlock_timeout = \"3s\"\npoll_wait = \"2s\"\nshutdown_timeout = \"10s\"\n";
