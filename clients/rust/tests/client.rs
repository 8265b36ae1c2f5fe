//! bussig-client against a real database: `BUSSIG_TEST_URL` names one that has the extension.
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bussig_client::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_postgres::Client;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Job {
    n: i64,
}

fn url() -> String {
    std::env::var("BUSSIG_TEST_URL").expect("BUSSIG_TEST_URL is not set: run `make test`")
}

async fn client() -> Client {
    (connect_no_tls(url()))().await.expect("connect")
}

/// A queue of its own (and its dead-letter queue), dropped when the test ends.
struct TestQueue {
    name: String,
}

impl TestQueue {
    async fn create(c: &Client, test: &str, options: &str) -> TestQueue {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000_000;
        let name = format!("client_{test}_{}_{nanos:x}", std::process::id());
        let sep = if options.is_empty() { "" } else { ", " };
        c.execute(
            &format!("SELECT bussig.create_queue($1{sep}{options})"),
            &[&name],
        )
        .await
        .expect("create_queue");
        TestQueue { name }
    }

    fn dlq(&self) -> String {
        format!("{}_dlq", self.name)
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let c = client().await;
                let _ = c.execute("SELECT bussig.drop_queue($1)", &[&name]).await;
            });
        })
        .join();
    }
}

/// (state, delivery_count) of each message `peek` shows, in delivery order.
async fn states(c: &Client, queue: &str) -> Vec<(String, i32)> {
    c.query(
        "SELECT state, delivery_count FROM bussig.peek($1, 100)",
        &[&queue],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sends_commit_with_the_callers_transaction_and_errors_keep_their_sqlstate() {
    let mut c = client().await;
    let q = TestQueue::create(&c, "send", "").await;

    let id = send(
        &c,
        &q.name,
        &Job { n: 1 },
        &SendOptions::new().header("k", "v").priority(3),
    )
    .await
    .unwrap();
    assert!(id.is_some());
    let ids = send_batch(
        &c,
        &q.name,
        &[Job { n: 2 }, Job { n: 3 }],
        &SendOptions::new(),
    )
    .await
    .unwrap();
    assert_eq!(ids.len(), 2);
    let options = SendOptions::new().dedup_id("once");
    assert!(send(&c, &q.name, &Job { n: 4 }, &options)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        send(&c, &q.name, &Job { n: 4 }, &options).await.unwrap(),
        None
    );

    let topic = TestQueue::create(&c, "publish", "").await;
    let pattern = format!("clienttest.p{}.*", std::process::id());
    c.execute("SELECT bussig.subscribe($1, $2)", &[&topic.name, &pattern])
        .await
        .unwrap();
    let subject = pattern.replace('*', "created");
    assert_eq!(
        publish(&c, &subject, &Job { n: 9 }, &SendOptions::new())
            .await
            .unwrap(),
        1
    );
    let published = read(&c, &topic.name, 10, None, None).await.unwrap();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].subject.as_deref(), Some(subject.as_str()));
    let acked = ack_batch(
        &c,
        &topic.name,
        &[(published[0].id, published[0].lock_token)],
    )
    .await;
    assert_eq!(acked.unwrap(), 1);

    let tx = c.transaction().await.unwrap();
    send(&tx, &q.name, &Job { n: 5 }, &SendOptions::new())
        .await
        .unwrap();
    assert_eq!(queue_depth(&tx, &q.name).await.unwrap(), 5);
    tx.rollback().await.unwrap();
    assert_eq!(queue_depth(&c, &q.name).await.unwrap(), 4);

    let first = read(&c, &q.name, 1, None, None).await.unwrap();
    assert_eq!(first[0].payload, json!({"n": 1}), "priority 3 first");
    assert_eq!(first[0].header("k"), Some("v"));
    let first = first.into_iter().next().unwrap().decode::<Job>().unwrap();
    assert!(ack(&c, &q.name, first.id, first.lock_token).await.unwrap());
    assert!(
        !ack(&c, &q.name, first.id, first.lock_token).await.unwrap(),
        "a stale token"
    );

    let unknown = send(&c, "no_such_queue_for_client", &1, &SendOptions::new()).await;
    assert!(
        matches!(unknown, Err(Error::UnknownQueue(ref m)) if m.contains("no_such_queue_for_client")),
        "{unknown:?}"
    );
    let invalid = send(&c, "_bad name", &1, &SendOptions::new()).await;
    assert!(
        matches!(invalid, Err(Error::InvalidArgument(_))),
        "{invalid:?}"
    );
    let none = dead_letter(&c, &q.dlq(), 1, uuid::Uuid::nil(), "x", None).await;
    assert!(matches!(none, Err(Error::NotInState(_))), "{none:?}");
}

#[tokio::test]
async fn each_handler_outcome_settles_its_message() {
    let c = client().await;
    let q = TestQueue::create(&c, "outcomes", "max_deliveries => 3").await;
    for n in 1..=5 {
        send(&c, &q.name, &Job { n }, &SendOptions::new())
            .await
            .unwrap();
    }
    send(&c, &q.name, &json!("not a job"), &SendOptions::new())
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(connect_no_tls(url()), q.name.clone())
        .concurrency(4)
        .wait(Duration::from_millis(200));
    let stats = consumer.stats();
    let running = tokio::spawn(consumer.run(
        |m: Message<Job>| async move {
            match (m.payload.n, m.delivery_count) {
                (1, _) => Ok(()),
                (2, 1) => Err(Failure::retry_after(Duration::ZERO)),
                (3, 1) => Err(std::io::Error::other("disk full"))?,
                (4, _) => Err(Failure::dead_letter("poison")),
                (5, 1) => panic!("handler bug"),
                _ => Ok(()),
            }
        },
        shutdown.clone(),
    ));
    eventually("every message settled", async || {
        queue_depth(&c, &q.name).await.unwrap() == 0
            && queue_depth(&c, &q.dlq()).await.unwrap() == 2
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    let reasons: Vec<String> = c
        .query(
            "SELECT headers ->> 'bussig-dead-letter-reason' FROM bussig.peek($1, 10) ORDER BY 1",
            &[&q.dlq()],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(reasons, ["poison", "undecodable"]);
    assert_eq!(
        stats.handled.load(Ordering::Relaxed),
        4,
        "1, and 2, 3, 5 on their second delivery"
    );
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        4,
        "2, 3, 4 and 5 once each"
    );
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 2);
    assert_eq!(stats.in_flight.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_long_handler_keeps_its_lock_and_shutdown_gives_back_what_is_unfinished() {
    let c = client().await;
    let q = TestQueue::create(&c, "shutdown", "").await;
    send(&c, &q.name, &Job { n: 1 }, &SendOptions::new())
        .await
        .unwrap();

    // A handler that runs three lock timeouts long still acks: the consumer extends its lock.
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(connect_no_tls(url()), q.name.clone())
        .lock_timeout(Duration::from_millis(600))
        .wait(Duration::from_millis(200));
    let stats = consumer.stats();
    let running = tokio::spawn(consumer.run(
        |_: Message<Job>| async move {
            tokio::time::sleep(Duration::from_millis(1800)).await;
            Ok(())
        },
        shutdown.clone(),
    ));
    eventually("the slow message acked", async || {
        stats.handled.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    eventually("its ack committed", async || {
        queue_depth(&c, &q.name).await.unwrap() == 0
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();

    // Shutdown with handlers in flight past the grace period: their messages are ready again at once.
    send_batch(
        &c,
        &q.name,
        &[Job { n: 2 }, Job { n: 3 }],
        &SendOptions::new(),
    )
    .await
    .unwrap();
    let consumer = Consumer::new(connect_no_tls(url()), q.name.clone())
        .concurrency(2)
        .lock_timeout(Duration::from_secs(60))
        .shutdown_grace(Duration::from_millis(100))
        .wait(Duration::from_millis(200));
    let stats = consumer.stats();
    let stopping = CancellationToken::new();
    let running_slow = tokio::spawn(consumer.run(
        |_: Message<Job>| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        },
        stopping.clone(),
    ));
    eventually("two handlers in flight", async || {
        stats.in_flight.load(Ordering::Relaxed) == 2
    })
    .await;
    let stop_started = Instant::now();
    stopping.cancel();
    running_slow.await.unwrap().unwrap();
    assert!(
        stop_started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        stop_started.elapsed()
    );
    assert_eq!(
        states(&c, &q.name).await,
        [("ready".to_string(), 1), ("ready".to_string(), 1)]
    );
}

#[tokio::test]
async fn requests_get_their_replies_and_a_request_nobody_answers_times_out() {
    let c = client().await;
    let q = TestQueue::create(&c, "prices", "").await;
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(connect_no_tls(url()), q.name.clone())
        .concurrency(4)
        .wait(Duration::from_millis(200));
    let running = tokio::spawn(consumer.run(
        |m: Message<Job>| async move {
            m.reply(&Job {
                n: m.payload.n * 10,
            })
            .await?;
            Ok(())
        },
        shutdown.clone(),
    ));
    let requester = Requester::start(connect_no_tls(url())).await.unwrap();
    let asked = (1..=8).map(|n| {
        let requester = requester.clone();
        let queue = q.name.clone();
        async move {
            requester
                .request::<_, Job>(&queue, &Job { n }, Duration::from_secs(10))
                .await
        }
    });
    let replies = futures_util::future::join_all(asked).await;
    for (n, reply) in (1..=8).zip(replies) {
        let reply = reply.unwrap();
        assert_eq!(
            reply.payload,
            Job { n: n * 10 },
            "each request gets its own reply"
        );
        assert!(reply.correlation_id.is_some());
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(
        queue_depth(&c, &q.name).await.unwrap(),
        0,
        "every request was acked by its reply"
    );

    // Nobody consumes now: the request times out, and its late reply goes nowhere.
    let started = Instant::now();
    let late = requester
        .request::<_, Job>(&q.name, &Job { n: 1 }, Duration::from_millis(300))
        .await;
    assert!(matches!(late, Err(Error::Timeout(_))), "{late:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // A request read by hand is answered with reply_with; reply needs a Consumer's connection.
    let by_hand = read(&c, &q.name, 1, None, None).await.unwrap().remove(0);
    assert!(matches!(by_hand.reply(&1).await, Err(Error::NotInState(_))));
    assert!(by_hand.reply_with(&c, &1).await.unwrap().is_some());
    eventually("the late reply acked and dropped", async || {
        queue_depth(&c, requester.reply_queue()).await.unwrap() == 0
    })
    .await;
    // A message without reply_to cannot be answered, and stays.
    send(&c, &q.name, &Job { n: 2 }, &SendOptions::new())
        .await
        .unwrap();
    let plain = read(&c, &q.name, 1, None, None).await.unwrap().remove(0);
    assert!(matches!(
        plain.reply_with(&c, &1).await,
        Err(Error::NotInState(_))
    ));
    assert_eq!(queue_depth(&c, &q.name).await.unwrap(), 1);
    requester.stop().await.unwrap();
    let gone: i64 = c
        .query_one(
            "SELECT count(*) FROM bussig.queues WHERE queue = $1",
            &[&requester.reply_queue()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gone, 0, "stop drops the reply queue");
}

#[tokio::test]
async fn a_transactional_handlers_writes_commit_with_its_ack_or_not_at_all() {
    let c = client().await;
    let q = TestQueue::create(
        &c,
        "transactional",
        "retry_delay => '0 seconds', lock_timeout => '2 seconds'",
    )
    .await;
    let effects = format!("{}_effects", q.name);
    c.batch_execute(&format!("CREATE TABLE {effects} (n bigint)"))
        .await
        .unwrap();
    for n in 1..=4 {
        send(&c, &q.name, &Job { n }, &SendOptions::new())
            .await
            .unwrap();
    }
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(connect_no_tls(url()), q.name.clone())
        .concurrency(3)
        .lock_timeout(Duration::from_secs(2))
        .wait(Duration::from_millis(200));
    let stats = consumer.stats();
    let table = effects.clone();
    let running = tokio::spawn(consumer.run_transactional(
        move |m: &Message<Job>, tx| {
            let table = table.clone();
            Box::pin(async move {
                tx.execute(&format!("INSERT INTO {table} VALUES ($1)"), &[&m.payload.n])
                    .await?;
                match (m.payload.n, m.delivery_count) {
                    (2, 1) => Err(Failure::retry_after(Duration::ZERO)),
                    (3, 1) => panic!("after writing"),
                    (4, 1) => {
                        // Another consumer takes the message over: this transaction must not commit.
                        let other = client().await;
                        other
                            .execute(
                                "UPDATE bussig.message SET lock_token = gen_random_uuid(),
                                        visible_at = clock_timestamp() + interval '300 ms'
                                 WHERE message_id = $1",
                                &[&m.id],
                            )
                            .await?;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            })
        },
        shutdown.clone(),
    ));
    eventually("every message handled", async || {
        queue_depth(&c, &q.name).await.unwrap() == 0
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    let written: Vec<i64> = c
        .query(&format!("SELECT n FROM {effects} ORDER BY n"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        written,
        [1, 2, 3, 4],
        "each message's writes committed once, with its ack"
    );
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        3,
        "2, 3 and 4 failed once each"
    );
    c.batch_execute(&format!("DROP TABLE {effects}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn every_broadcast_subscriber_gets_each_message_and_its_queue_goes_with_it() {
    let c = client().await;
    let pattern = format!("clienttest.broadcast{}.>", std::process::id());
    let shutdown = CancellationToken::new();
    let mut running = Vec::new();
    let mut queues = Vec::new();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, i64)>();
    for instance in 0..2 {
        let broadcast = Broadcast::subscribe(connect_no_tls(url()), &pattern)
            .await
            .unwrap()
            .configure(|consumer| consumer.wait(Duration::from_millis(200)));
        queues.push(broadcast.queue().to_string());
        let seen = seen_tx.clone();
        running.push(tokio::spawn(broadcast.run(
            move |m: Message<Job>| {
                let seen = seen.clone();
                async move {
                    seen.send((instance, m.payload.n)).unwrap();
                    Ok(())
                }
            },
            shutdown.clone(),
        )));
    }
    let subject = pattern.replace('>', "cache.users");
    assert_eq!(
        publish(&c, &subject, &Job { n: 7 }, &SendOptions::new())
            .await
            .unwrap(),
        2
    );
    let mut got = Vec::new();
    while got.len() < 2 {
        let next = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv()).await;
        got.push(next.expect("both instances get it").unwrap());
    }
    got.sort();
    assert_eq!(got, [(0, 7), (1, 7)]);
    shutdown.cancel();
    for run in running {
        run.await.unwrap().unwrap();
    }
    for queue in queues {
        let left: i64 = c
            .query_one(
                "SELECT count(*) FROM bussig.queues WHERE queue = $1",
                &[&queue],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "{queue} is dropped at shutdown");
    }
}
