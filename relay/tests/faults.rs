//! Faults: a relay killed in the middle of a batch, NATS stopped under load, two relays at once,
//! SIGTERM while a batch cannot be published. After each, the stream holds every message once.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

fn payloads(range: std::ops::Range<i64>) -> Vec<Value> {
    range.map(|i| json!({ "i": i })).collect()
}

/// Ids of messages that are both in the stream and still in the queue (locked): stored, not yet
/// acknowledged, so a restarted relay must send them again and JetStream must drop the copy.
async fn stored_but_unacknowledged(
    db: &tokio_postgres::Client,
    stored: &[Stored],
    queue: &str,
) -> usize {
    let in_queue: Vec<i64> = peek(db, queue).await.iter().map(|(id, _, _)| *id).collect();
    stored
        .iter()
        .filter(|m| m.header("Bussig-Queue") == Some(queue) && in_queue.contains(&m.message_id()))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_in_the_middle_of_a_batch_resumes_without_loss_or_duplicates() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "KILL", &["kill.>"], -1).await;
    let queue = Queue::create(&db, "kill", "").await;
    let mut ids = Vec::new();
    for chunk in 0..10 {
        ids.extend(send_batch(&db, &queue.name, &payloads(chunk * 300..(chunk + 1) * 300)).await);
    }
    let config = format!(
        "{FAST}{}",
        route(&queue.name, "kill.out", "batch_size = 50")
    );
    let mut relay = Relay::spawn(&nats.url(), &config);

    // SIGKILL while messages are locked by the relay: a batch was in flight.
    let mut rounds = 0;
    let resent = loop {
        rounds += 1;
        let before = stream_count(&js, "KILL").await;
        eventually(LONG, "the relay to make progress", async || {
            (stream_count(&js, "KILL").await > before + 100).then_some(())
        })
        .await;
        relay.kill();
        let (_, _, locked) = counts(&db, &queue.name).await;
        let stored = stream_messages(&js, "KILL").await;
        assert!(
            stored.len() < ids.len(),
            "the relay finished before it could be killed"
        );
        if locked > 0 {
            break stored_but_unacknowledged(&db, &stored, &queue.name).await;
        }
        assert!(rounds < 5, "never caught the relay with a batch in flight");
        relay.start(&nats.url());
    };

    relay.start(&nats.url());
    wait_relayed(&db, &js, "KILL", &queue.name, ids.len(), LONG).await;
    assert_exactly_once(
        &stream_messages(&js, "KILL").await,
        &queue.name,
        &ids,
        false,
    );
    if resent > 0 {
        let duplicates = format!("bussig_relay_duplicates_total{{route=\"{}\"}}", queue.name);
        let removed = metric(&relay.metrics().await, &duplicates).unwrap_or(0.0);
        assert!(
            removed >= resent as f64,
            "{resent} re-sent, JetStream removed {removed}"
        );
    }
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stopped_under_load_loses_and_duplicates_nothing() {
    let db = connect().await;
    let mut nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "OUTAGE", &["outage.>"], -1).await;
    let plain = Queue::create(&db, "outage_plain", "").await;
    let ordered = Queue::create(&db, "outage_ordered", "").await;
    let config = format!(
        "{FAST}{}{}",
        route(
            &plain.name,
            "outage.plain",
            "batch_size = 20\nconcurrency = 2"
        ),
        route(
            &ordered.name,
            "outage.ordered",
            "batch_size = 20\nordered = true"
        ),
    );
    let mut relay = Relay::start_ready(&nats.url(), &config).await;

    let producer = Producer::start(vec![plain.name.clone(), ordered.name.clone()]);

    eventually(LONG, "messages flowing before the outage", async || {
        (stream_count(&js, "OUTAGE").await >= 100).then_some(())
    })
    .await;
    nats.stop().await;
    let port = relay.metrics_port;
    let body = eventually(LONG, "/ready to report NATS down", async || match http_get(
        port, "/ready",
    )
    .await
    {
        Some((503, body)) => Some(body),
        _ => None,
    })
    .await;
    assert!(body.contains("NATS disconnected"), "{body}");
    // Keep producing until the relay has held messages NATS could not take.
    let unavailable = format!(
        "bussig_relay_failed_total{{route=\"{}\",reason=\"unavailable\"}}",
        plain.name
    );
    eventually(LONG, "publishes failing while NATS is away", async || {
        (metric(&relay.metrics().await, &unavailable)? > 0.0).then_some(())
    })
    .await;
    // Keep producing for a few seconds' worth of messages while NATS is away.
    producer
        .wait_for_more(300, "messages sent during the outage")
        .await;
    relay.assert_running();

    nats.restart().await;
    relay.wait_ready().await;
    producer
        .wait_for_more(100, "messages sent after the outage")
        .await;
    let ids = producer.finish().await;
    let (plain_ids, ordered_ids) = (&ids[0], &ids[1]);

    let js = nats.jetstream().await;
    wait_relayed(&db, &js, "OUTAGE", &plain.name, plain_ids.len(), LONG).await;
    wait_relayed(&db, &js, "OUTAGE", &ordered.name, ordered_ids.len(), LONG).await;
    let stored = stream_messages(&js, "OUTAGE").await;
    assert_exactly_once(&stored, &plain.name, plain_ids, false);
    assert_exactly_once(&stored, &ordered.name, ordered_ids, true);
    assert_eq!(
        total(&db, &plain.dlq()).await,
        0,
        "the outage dead-lettered messages"
    );
    assert_eq!(
        total(&db, &ordered.dlq()).await,
        0,
        "the outage dead-lettered messages"
    );
    relay.assert_running();
}

/// Commits one message to each queue every few milliseconds until stopped; returns the ids.
struct Producer {
    sent: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Vec<i64>>>,
}

impl Producer {
    fn start(queues: Vec<String>) -> Producer {
        let sent = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopped) = (sent.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let db = connect().await;
            let mut ids = vec![Vec::new(); queues.len()];
            let mut pace = tokio::time::interval(Duration::from_millis(5));
            let mut i = 0;
            while !stopped.load(Ordering::Relaxed) {
                pace.tick().await;
                for (queue, ids) in queues.iter().zip(&mut ids) {
                    ids.extend(send_each(&db, queue, [json!({ "i": i })]).await);
                }
                i += 1;
                counter.store(i as usize, Ordering::Relaxed);
            }
            ids
        });
        Producer { sent, stop, task }
    }

    /// Waits until `count` more rounds have been sent.
    async fn wait_for_more(&self, count: usize, what: &str) {
        let from = self.sent.load(Ordering::Relaxed);
        eventually(LONG, what, async || {
            (self.sent.load(Ordering::Relaxed) >= from + count).then_some(())
        })
        .await;
    }

    async fn finish(self) -> Vec<Vec<i64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("producer")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_sessions_lost_under_load_lose_and_duplicate_nothing() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "DBLOSS", &["dbloss.>"], -1).await;
    let plain = Queue::create(&db, "dbloss_plain", "").await;
    let ordered = Queue::create(&db, "dbloss_ordered", "").await;
    let config = format!(
        "{FAST}{}{}",
        route(
            &plain.name,
            "dbloss.plain",
            "batch_size = 20\nconcurrency = 2"
        ),
        route(
            &ordered.name,
            "dbloss.ordered",
            "batch_size = 20\nordered = true"
        ),
    );
    // A session name of its own, so only this relay's sessions are terminated.
    let session = format!("relay_{}", plain.name);
    let url = format!("{} application_name={session}", database_url());
    let mut relay = Relay::spawn_on(&url, &nats.url(), &config);
    relay.wait_ready().await;
    let producer = Producer::start(vec![plain.name.clone(), ordered.name.clone()]);

    for _ in 0..3 {
        producer
            .wait_for_more(100, "messages before terminating sessions")
            .await;
        let terminated: i64 = db
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = $1",
                &[&session],
            )
            .await
            .expect("terminate the relay's sessions")
            .get(0);
        assert!(terminated >= 3, "terminated {terminated} sessions");
    }
    producer
        .wait_for_more(100, "messages after the last termination")
        .await;
    let ids = producer.finish().await;

    wait_relayed(&db, &js, "DBLOSS", &plain.name, ids[0].len(), LONG).await;
    wait_relayed(&db, &js, "DBLOSS", &ordered.name, ids[1].len(), LONG).await;
    let stored = stream_messages(&js, "DBLOSS").await;
    assert_exactly_once(&stored, &plain.name, &ids[0], false);
    assert_exactly_once(&stored, &ordered.name, &ids[1], true);
    relay.assert_running();
    assert!(relay.log().contains("reconnecting"), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_the_work_and_one_drains_an_ordered_queue() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "PAIR", &["pair.>"], -1).await;
    let plain = Queue::create(&db, "pair_plain", "").await;
    let ordered = Queue::create(&db, "pair_ordered", "").await;
    let mut plain_ids = send_batch(&db, &plain.name, &payloads(0..600)).await;
    let mut ordered_ids = send_batch(&db, &ordered.name, &payloads(0..200)).await;
    let config = format!(
        "{FAST}{}{}",
        route(
            &plain.name,
            "pair.plain",
            "batch_size = 20\nconcurrency = 2"
        ),
        route(
            &ordered.name,
            "pair.ordered",
            "batch_size = 10\nordered = true"
        ),
    );
    let first = Relay::spawn(&nats.url(), &config);
    let second = Relay::spawn(&nats.url(), &config);
    first.wait_ready().await;
    second.wait_ready().await;
    plain_ids.extend(send_each(&db, &plain.name, payloads(600..800)).await);
    ordered_ids.extend(send_each(&db, &ordered.name, payloads(200..400)).await);

    wait_relayed(&db, &js, "PAIR", &plain.name, plain_ids.len(), LONG).await;
    wait_relayed(&db, &js, "PAIR", &ordered.name, ordered_ids.len(), LONG).await;
    let stored = stream_messages(&js, "PAIR").await;
    assert_exactly_once(&stored, &plain.name, &plain_ids, false);
    assert_exactly_once(&stored, &ordered.name, &ordered_ids, true);

    let published = |route: &str| format!("bussig_relay_published_total{{route=\"{route}\"}}");
    let (a, b) = (first.metrics().await, second.metrics().await);
    let plain_counts = (
        metric(&a, &published(&plain.name)).unwrap(),
        metric(&b, &published(&plain.name)).unwrap(),
    );
    assert_eq!(
        plain_counts.0 + plain_counts.1,
        plain_ids.len() as f64,
        "{plain_counts:?}"
    );
    let ordered_counts = (
        metric(&a, &published(&ordered.name)).unwrap(),
        metric(&b, &published(&ordered.name)).unwrap(),
    );
    assert!(
        ordered_counts.0 == 0.0 || ordered_counts.1 == 0.0,
        "both relays drained the ordered queue: {ordered_counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_a_batch_nats_never_confirmed() {
    let db = connect().await;
    let mut nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "TERM", &["term.>"], -1).await;
    let queue = Queue::create(&db, "term", "lock_timeout => '5 minutes'").await;
    let config = format!(
        "{FAST}{}",
        route(
            &queue.name,
            "term.out",
            "batch_size = 10\nlock_timeout = \"5m\""
        )
    );
    let mut relay = Relay::start_ready(&nats.url(), &config).await;
    nats.stop().await;
    send_each(&db, &queue.name, payloads(0..30)).await;
    eventually(LONG, "the relay to hold a batch", async || {
        (counts(&db, &queue.name).await.2 > 0).then_some(())
    })
    .await;

    let status = relay.terminate().await;
    assert!(status.success(), "SIGTERM ended the relay with {status}");
    // Released, not left to a five-minute lock: every message is ready again at once.
    assert_eq!(counts(&db, &queue.name).await, (30, 0, 0));
    assert!(relay.log().contains("shutting down"), "{}", relay.log());
}
