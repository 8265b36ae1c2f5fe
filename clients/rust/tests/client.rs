//! bussig-client against a real database: sending, each handler outcome, locks and shutdown.
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bussig_client::*;
use serde_json::json;

mod common;
use common::*;
use tokio_postgres::types::Type;

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
    c.query_typed(
        "SELECT bussig.subscribe($1, $2)",
        &[(&topic.name, Type::TEXT), (&pattern, Type::TEXT)],
    )
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
        .query_typed(
            "SELECT headers ->> 'bussig-dead-letter-reason' FROM bussig.peek($1, 10) ORDER BY 1",
            &[(&q.dlq(), Type::TEXT)],
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

/// The consumer's connection ended by the server while handlers run: it connects again (preparing
/// its statement again when it keeps it prepared), and every message is handled, none left behind.
#[tokio::test]
async fn a_consumer_whose_connection_is_killed_reconnects_and_loses_nothing() {
    for prepared in [false, true] {
        killed_mid_batch(prepared).await;
    }
}

async fn killed_mid_batch(prepared: bool) {
    let c = client().await;
    let q = TestQueue::create(
        &c,
        &format!("killed_{prepared}"),
        "lock_timeout => '2 seconds'",
    )
    .await;
    const MESSAGES: i64 = 40;
    for n in 0..MESSAGES {
        send(&c, &q.name, &Job { n }, &SendOptions::new())
            .await
            .unwrap();
    }
    // Direct, not through a pooler: the kill must reach this consumer's own server connection.
    let application = format!("killed_{prepared}_{}", std::process::id());
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(
        connect_no_tls(format!("{} application_name={application}", session_url())),
        q.name.clone(),
    )
    .concurrency(4)
    .batch(4)
    .lock_timeout(Duration::from_secs(2))
    .wait(Duration::from_millis(200))
    .prepared_statements(prepared);
    let stats = consumer.stats();
    let handled = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let seen = handled.clone();
    let running = tokio::spawn(consumer.run(
        move |m: Message<Job>| {
            let seen = seen.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                seen.lock().unwrap().insert(m.payload.n);
                Ok(())
            }
        },
        shutdown.clone(),
    ));
    eventually("a few messages handled", async || {
        handled.lock().unwrap().len() >= 8
    })
    .await;
    assert_eq!(
        kill_connections(&application).await,
        1,
        "the consumer's one connection"
    );
    eventually("every message handled and acked", async || {
        handled.lock().unwrap().len() == MESSAGES as usize
            && queue_depth(&c, &q.name).await.unwrap() == 0
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(
        stats.reconnects.load(Ordering::Relaxed),
        1,
        "prepared: {prepared}"
    );
    assert_eq!(stats.in_flight.load(Ordering::Relaxed), 0);
}

/// A handler that runs through the loss of the consumer's connection (the loop itself waits for that
/// handler, with nothing to read on) keeps its lock: it extends it on a connection made anew, so no
/// other reader gets the message meanwhile, and it is acked once.
#[tokio::test]
async fn a_handler_keeps_its_lock_through_a_lost_connection() {
    let c = client().await;
    let q = TestQueue::create(&c, "handler_reconnects", "lock_timeout => '2 seconds'").await;
    send(&c, &q.name, &Job { n: 1 }, &SendOptions::new())
        .await
        .unwrap();
    let application = format!("handler_reconnects_{}", std::process::id());
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(
        connect_no_tls(format!("{} application_name={application}", session_url())),
        q.name.clone(),
    )
    .concurrency(1)
    .lock_timeout(Duration::from_secs(2))
    .wait(Duration::from_millis(200));
    let stats = consumer.stats();
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let handler_started = started.clone();
    let running = tokio::spawn(consumer.run(
        move |_: Message<Job>| {
            let started = handler_started.clone();
            async move {
                started.notify_one();
                tokio::time::sleep(Duration::from_secs(6)).await;
                Ok(())
            }
        },
        shutdown.clone(),
    ));
    started.notified().await;
    let began = Instant::now();
    assert_eq!(
        kill_connections(&application).await,
        1,
        "the consumer's one connection"
    );
    let direct = (connect_no_tls(session_url()))().await.unwrap();
    // Well past the lock the handler took, which only an extension keeps.
    tokio::time::sleep(Duration::from_millis(4_500).saturating_sub(began.elapsed())).await;
    let taken = read(&direct, &q.name, 1, None, None).await.unwrap();
    assert!(
        taken.is_empty(),
        "another reader got the message while its handler ran"
    );
    eventually("the message handled and acked", async || {
        stats.handled.load(Ordering::Relaxed) == 1 && queue_depth(&c, &q.name).await.unwrap() == 0
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(stats.handled.load(Ordering::Relaxed), 1);
}

/// A handler whose lock is gone when the consumer comes to extend it (the message was purged from
/// under it) hears of it through `lock_lost`, and the consumer stops extending.
#[tokio::test]
async fn a_handler_hears_when_its_lock_is_gone() {
    let c = client().await;
    let q = TestQueue::create(&c, "lock_lost", "lock_timeout => '1 second'").await;
    send(&c, &q.name, &Job { n: 1 }, &SendOptions::new())
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(connect_no_tls(url()), q.name.clone())
        .lock_timeout(Duration::from_secs(1))
        .wait(Duration::from_millis(200));
    let stats = consumer.stats();
    let (heard_tx, mut heard_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let running = tokio::spawn(consumer.run(
        move |m: Message<Job>| {
            let (heard, started) = (heard_tx.clone(), started_tx.clone());
            async move {
                started.send(()).unwrap();
                let lost = m.lock_lost();
                let heard_in_time =
                    tokio::time::timeout(Duration::from_secs(10), lost.cancelled()).await;
                heard.send(heard_in_time.is_ok()).unwrap();
                Ok(())
            }
        },
        shutdown.clone(),
    ));
    started_rx.recv().await.unwrap();
    let extended_so_far = stats.locks_lost.load(Ordering::Relaxed);
    assert_eq!(
        extended_so_far, 0,
        "the lock holds while the message is there"
    );
    c.query_typed(
        "SELECT bussig.purge_queue($1)",
        &[(&q.name.as_str(), Type::TEXT)],
    )
    .await
    .unwrap();
    assert!(
        heard_rx.recv().await.unwrap(),
        "the handler heard within 10 s that its lock was gone"
    );
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(stats.locks_lost.load(Ordering::Relaxed), 1);
    assert_eq!(stats.handled.load(Ordering::Relaxed), 1);

    // A message read by hand has no consumer to tell it: its token is never cancelled.
    send(&c, &q.name, &Job { n: 2 }, &SendOptions::new())
        .await
        .unwrap();
    let by_hand = read(&c, &q.name, 1, None, None).await.unwrap().remove(0);
    assert!(!by_hand.lock_lost().is_cancelled());
}

/// A message that comes while a handler runs long is read with the free slots meanwhile, not after
/// that handler.
#[tokio::test]
async fn a_long_handler_does_not_keep_the_free_slots_from_reading() {
    let c = client().await;
    let q = TestQueue::create(&c, "busy_reads", "").await;
    send(&c, &q.name, &Job { n: 1 }, &SendOptions::new())
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(connect_no_tls(url()), q.name.clone())
        .concurrency(2)
        .wait(Duration::from_secs(5));
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<i64>();
    let running = tokio::spawn(consumer.run(
        move |m: Message<Job>| {
            let started = started_tx.clone();
            async move {
                started.send(m.payload.n).unwrap();
                if m.payload.n == 1 {
                    tokio::time::sleep(Duration::from_secs(6)).await;
                }
                Ok(())
            }
        },
        shutdown.clone(),
    ));
    assert_eq!(started_rx.recv().await, Some(1));
    // Past the read that found nothing while 1 runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    send(&c, &q.name, &Job { n: 2 }, &SendOptions::new())
        .await
        .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(3), started_rx.recv()).await;
    assert_eq!(
        second.ok().flatten(),
        Some(2),
        "the second message waited for the long handler"
    );
    assert!(sent.elapsed() < Duration::from_secs(3));
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

/// A handler that asks for a dead letter in a queue without a dead-letter queue (a dead-letter queue
/// itself): the refusal (55000) gives the message back with the queue's backoff and the refusal as
/// its error, instead of leaving it locked until its lock runs out.
#[tokio::test]
async fn a_refused_dead_letter_gives_the_message_back() {
    let c = client().await;
    let q = TestQueue::create(&c, "no_dlq", "").await;
    let dlq = q.dlq();
    c.query_typed(
        "SELECT bussig.alter_queue($1, retry_delay => '1 hour', retry_delay_max => '1 hour')",
        &[(&dlq.as_str(), Type::TEXT)],
    )
    .await
    .unwrap();
    let id = send(&c, &dlq, &Job { n: 1 }, &SendOptions::new())
        .await
        .unwrap()
        .unwrap();
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(connect_no_tls(url()), dlq.clone())
        .lock_timeout(Duration::from_secs(600))
        .wait(Duration::from_millis(200));
    let stats = consumer.stats();
    let running = tokio::spawn(consumer.run(
        |_: Message<Job>| async move { Err(Failure::dead_letter("poison")) },
        shutdown.clone(),
    ));
    eventually("the refused dead letter given back", async || {
        stats.failed.load(Ordering::Relaxed) == 1
            && states(&c, &dlq).await == [("delayed".to_string(), 1)]
    })
    .await;
    let error: String = c
        .query_typed(
            "SELECT last_error FROM bussig.message WHERE message_id = $1",
            &[(&id, Type::INT8)],
        )
        .await
        .unwrap()[0]
        .get(0);
    assert!(error.starts_with("not dead-lettered (poison)"), "{error}");
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
}

/// A handler that acked its message itself and works on past half the lock is not told the lock is
/// lost: the message is settled, not taken.
#[tokio::test]
async fn a_handler_that_settled_its_message_is_not_told_of_a_lost_lock() {
    let c = client().await;
    let q = TestQueue::create(&c, "settled_early", "lock_timeout => '1 second'").await;
    send(&c, &q.name, &Job { n: 1 }, &SendOptions::new())
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(connect_no_tls(url()), q.name.clone())
        .lock_timeout(Duration::from_secs(1))
        .wait(Duration::from_millis(200));
    let stats = consumer.stats();
    let (heard_tx, mut heard_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let running = tokio::spawn(consumer.run(
        move |m: Message<Job>| {
            let heard = heard_tx.clone();
            async move {
                assert!(m.ack().await?);
                let lost = m.lock_lost();
                let told = tokio::time::timeout(Duration::from_millis(1_800), lost.cancelled());
                heard.send(told.await.is_ok()).unwrap();
                Ok(())
            }
        },
        shutdown.clone(),
    ));
    assert_eq!(heard_rx.recv().await, Some(false), "told of a lost lock");
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(stats.locks_lost.load(Ordering::Relaxed), 0);
}
