//! Helpers for the client tests: `BUSSIG_TEST_URL` names a database that has the extension.
#![allow(dead_code)]
use std::time::{Duration, Instant};

use bussig_client::{connect_no_tls, StreamRecord};
use serde::{Deserialize, Serialize};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub n: i64,
}

pub fn url() -> String {
    std::env::var("BUSSIG_TEST_URL").expect("BUSSIG_TEST_URL is not set: run `make test`")
}

/// A connection to the server itself, never through a pooling proxy: `BUSSIG_TEST_SESSION_URL`,
/// else `BUSSIG_TEST_URL`.
pub fn session_url() -> String {
    std::env::var("BUSSIG_TEST_SESSION_URL").unwrap_or_else(|_| url())
}

pub async fn client() -> Client {
    (connect_no_tls(url()))().await.expect("connect")
}

/// A name no other test or run uses.
pub fn unique_name(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000_000;
    format!("client_{test}_{}_{nanos:x}", std::process::id())
}

/// Runs `sql` on a connection of its own, from a `Drop`, where no runtime may be blocked on.
fn run_on_the_side(sql: &'static str, name: String) {
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let c = client().await;
            let _ = c.query_typed(sql, &[(&name, Type::TEXT)]).await;
        });
    })
    .join();
}

/// A queue of its own (and its dead-letter queue), dropped when the test ends.
pub struct TestQueue {
    pub name: String,
}

impl TestQueue {
    pub async fn create(c: &Client, test: &str, options: &str) -> TestQueue {
        let name = unique_name(test);
        let sep = if options.is_empty() { "" } else { ", " };
        // Unnamed statements only (query_typed): the tests also run through pgbouncer.
        c.query_typed(
            &format!("SELECT bussig.create_queue($1{sep}{options})"),
            &[(&name, Type::TEXT)],
        )
        .await
        .expect("create_queue");
        TestQueue { name }
    }

    pub fn dlq(&self) -> String {
        format!("{}_dlq", self.name)
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        run_on_the_side("SELECT bussig.drop_queue($1)", self.name.clone());
    }
}

/// A stream of its own with `partitions` and one consumer group, `group`, reading from the earliest
/// record; dropped when the test ends.
pub struct TestStream {
    pub name: String,
}

impl TestStream {
    pub async fn create(c: &Client, test: &str, partitions: i32) -> TestStream {
        let name = unique_name(test);
        c.query_typed(
            "SELECT bussig.create_stream($1, partitions => $2),
                    bussig.create_consumer_group($1, 'group', start_at => 'earliest')",
            &[(&name, Type::TEXT), (&partitions, Type::INT4)],
        )
        .await
        .expect("create_stream");
        TestStream { name }
    }

    /// (committed_seq, head_seq) of each partition of `group`, in partition order.
    pub async fn positions(&self, c: &Client) -> Vec<(i64, i64)> {
        c.query_typed(
            "SELECT committed_seq, head_seq FROM bussig.consumer_groups
             WHERE stream = $1 AND consumer_group = 'group' ORDER BY partition",
            &[(&self.name, Type::TEXT)],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        run_on_the_side("SELECT bussig.drop_stream($1)", self.name.clone());
    }
}

/// (state, delivery_count) of each message `peek` shows, in delivery order.
pub async fn states(c: &Client, queue: &str) -> Vec<(String, i32)> {
    c.query_typed(
        "SELECT state, delivery_count FROM bussig.peek($1, 100)",
        &[(&queue, Type::TEXT)],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ends every server connection of `application`, from a connection of its own made directly:
/// through a pooler, a test's usual connection could be handed one of those. How many it ended.
pub async fn kill_connections(application: &str) -> i64 {
    let direct = (connect_no_tls(session_url()))().await.unwrap();
    direct
        .query_typed(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[(&application, Type::TEXT)],
        )
        .await
        .unwrap()[0]
        .get(0)
}

/// How long the tests' stream reads lease their partitions.
pub const LEASE: Duration = Duration::from_secs(30);

/// The `n` of each record's `Job` payload, in order.
pub fn jobs(records: &[StreamRecord]) -> Vec<i64> {
    records
        .iter()
        .map(|record| record.payload_as::<Job>().unwrap().n)
        .collect()
}
