//! bussig-client's patterns against a real database: request/reply, transactional handlers, broadcast
//! and streams.
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bussig_client::*;
use tokio_postgres::types::Type;

mod common;
use common::*;

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
        .query_typed(
            "SELECT count(*) FROM bussig.queues WHERE queue = $1",
            &[(&requester.reply_queue(), Type::TEXT)],
        )
        .await
        .unwrap()[0]
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
                tx.query_typed(
                    &format!("INSERT INTO {table} VALUES ($1)"),
                    &[(&m.payload.n, Type::INT8)],
                )
                .await?;
                match (m.payload.n, m.delivery_count) {
                    (2, 1) => Err(Failure::retry_after(Duration::ZERO)),
                    (3, 1) => panic!("after writing"),
                    (4, 1) => {
                        // Another consumer takes the message over: this transaction must not commit.
                        let other = client().await;
                        other
                            .query_typed(
                                "UPDATE bussig.message SET lock_token = gen_random_uuid(),
                                        visible_at = clock_timestamp() + interval '300 ms'
                                 WHERE message_id = $1",
                                &[(&m.id, Type::INT8)],
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
        .query_typed(&format!("SELECT n FROM {effects} ORDER BY n"), &[])
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

/// A transactional handler answers a request in its own transaction: the reply, the handler's write
/// and the request's ack commit together, once, and the consumer adds no ack of its own.
#[tokio::test]
async fn a_transactional_handler_replies_in_its_transaction() {
    let c = client().await;
    let q = TestQueue::create(&c, "answered_in_tx", "").await;
    let effects = format!("{}_effects", q.name);
    c.batch_execute(&format!("CREATE TABLE {effects} (n bigint, delivery int)"))
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(connect_no_tls(url()), q.name.clone())
        .concurrency(2)
        .wait(Duration::from_millis(200));
    let stats = consumer.stats();
    let table = effects.clone();
    let running = tokio::spawn(consumer.run_transactional(
        move |m: &Message<Job>, tx| {
            let table = table.clone();
            Box::pin(async move {
                tx.query_typed(
                    &format!("INSERT INTO {table} VALUES ($1, $2)"),
                    &[(&m.payload.n, Type::INT8), (&m.delivery_count, Type::INT4)],
                )
                .await?;
                m.reply_with(tx, &Job { n: -m.payload.n }).await?;
                Ok(())
            })
        },
        shutdown.clone(),
    ));
    let requester = Requester::start(connect_no_tls(url())).await.unwrap();
    for n in 1..=3 {
        let reply = requester
            .request::<_, Job>(&q.name, &Job { n }, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(reply.payload, Job { n: -n });
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
    requester.stop().await.unwrap();
    let written: Vec<(i64, i32)> = c
        .query_typed(
            &format!("SELECT n, delivery FROM {effects} ORDER BY n"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        written,
        [(1, 1), (2, 1), (3, 1)],
        "each write committed once, on the first delivery"
    );
    assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    assert_eq!(queue_depth(&c, &q.name).await.unwrap(), 0);
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
            .query_typed(
                "SELECT count(*) FROM bussig.queues WHERE queue = $1",
                &[(&queue, Type::TEXT)],
            )
            .await
            .unwrap()[0]
            .get(0);
        assert_eq!(left, 0, "{queue} is dropped at shutdown");
    }
}

#[tokio::test]
async fn a_stream_hands_out_deliveries_that_settle_themselves() {
    use futures_util::StreamExt;
    let c = client().await;
    let q = TestQueue::create(&c, "stream", "").await;
    send_batch(
        &c,
        &q.name,
        &[Job { n: 1 }, Job { n: 2 }, Job { n: 3 }],
        &SendOptions::new(),
    )
    .await
    .unwrap();
    let own = std::sync::Arc::new(client().await);
    let deliveries = stream(own, &q.name, 2, None, Duration::from_millis(200));
    tokio::pin!(deliveries);
    let first = deliveries.next().await.unwrap().unwrap();
    let second = deliveries.next().await.unwrap().unwrap();
    let third = deliveries.next().await.unwrap().unwrap();
    assert_eq!(
        [&first, &second, &third].map(|m| m.payload["n"].as_i64().unwrap()),
        [1, 2, 3],
        "in delivery order, across batches"
    );
    assert!(first.ack().await.unwrap());
    assert!(!first.ack().await.unwrap(), "a stale token");
    assert!(second
        .extend_lock(Some(Duration::from_secs(120)))
        .await
        .unwrap());
    assert!(third
        .nack(Some(Duration::ZERO), Some("later"))
        .await
        .unwrap());
    assert_eq!(
        states(&c, &q.name).await,
        [("ready".to_string(), 1), ("locked".to_string(), 1)],
        "3 is back, 2 is still held"
    );
    let again = deliveries.next().await.unwrap().unwrap();
    assert_eq!((again.id, again.delivery_count), (third.id, 2));
    assert!(again.dead_letter("done with it", None).await.unwrap());
    let by_hand = read(&c, &q.dlq(), 1, None, None).await.unwrap().remove(0);
    assert!(
        matches!(by_hand.ack().await, Err(Error::NotInState(_))),
        "read by hand: no connection"
    );
}

#[tokio::test]
async fn a_bus_sends_over_its_pool_and_makes_consumers() {
    let c = client().await;
    let q = TestQueue::create(&c, "bus", "").await;
    let bus = Bus::new(&url(), 2).unwrap();
    let sends = (1..=6).map(|n| {
        let (bus, queue) = (bus.clone(), q.name.clone());
        async move { bus.send(&queue, &Job { n }, &SendOptions::new()).await }
    });
    for sent in futures_util::future::join_all(sends).await {
        assert!(sent.unwrap().is_some());
    }
    assert!(
        bus.pool().status().size <= 2,
        "never more than the pool's size"
    );
    assert_eq!(bus.queue_depth(&q.name).await.unwrap(), 6);
    let unknown = bus
        .send("no_such_queue_for_bus", &1, &SendOptions::new())
        .await;
    assert!(
        matches!(unknown, Err(Error::UnknownQueue(_))),
        "{unknown:?}"
    );

    let shutdown = CancellationToken::new();
    let consumer = bus
        .consumer(q.name.clone())
        .wait(Duration::from_millis(200));
    let stats = consumer.stats();
    let running = tokio::spawn(consumer.run(|_: Message<Job>| async { Ok(()) }, shutdown.clone()));
    eventually("the bus's consumer took all", async || {
        bus.queue_depth(&q.name).await.unwrap() == 0
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(stats.handled.load(Ordering::Relaxed), 6);
}

/// The requester's connections are killed and its reply queue dropped (as the worker drops it when
/// the process was away from the database past its ttl): the requester connects again, makes the
/// queue again, and its next requests get their replies.
#[tokio::test]
async fn a_requester_comes_back_after_the_database_was_lost() {
    let c = client().await;
    let q = TestQueue::create(&c, "requester_back", "").await;
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(connect_no_tls(url()), q.name.clone())
        .concurrency(2)
        .wait(Duration::from_millis(200));
    let running = tokio::spawn(consumer.run(
        |m: Message<Job>| async move {
            m.reply(&Job { n: m.payload.n + 1 }).await?;
            Ok(())
        },
        shutdown.clone(),
    ));
    let application = format!("requester_back_{}", std::process::id());
    let requester = Requester::start(connect_no_tls(format!(
        "{} application_name={application}",
        session_url()
    )))
    .await
    .unwrap();
    let ask = async |n: i64| {
        requester
            .request::<_, Job>(&q.name, &Job { n }, Duration::from_secs(10))
            .await
    };
    assert_eq!(ask(1).await.unwrap().payload, Job { n: 2 });

    assert_eq!(kill_connections(&application).await, 2, "sender and reader");
    // A send that meets the loss fails with it (in doubt, as any send is then); the next finds its
    // connection closed and connects anew. The reader reconnects by itself.
    let after_loss = match ask(10).await {
        Err(error) if error.is_connection() => ask(10).await,
        answered => answered,
    };
    assert_eq!(after_loss.unwrap().payload, Job { n: 11 });

    c.query_typed(
        "SELECT bussig.drop_queue($1)",
        &[(&requester.reply_queue(), Type::TEXT)],
    )
    .await
    .unwrap();
    eventually("the reply queue made again", async || {
        queue_depth(&c, requester.reply_queue()).await.is_ok()
    })
    .await;
    assert_eq!(ask(20).await.unwrap().payload, Job { n: 21 });

    requester.stop().await.unwrap();
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

/// A broadcast subscriber whose connections are killed and whose queue is dropped meanwhile makes
/// the queue again and gets what is published after that.
#[tokio::test]
async fn a_broadcast_subscriber_comes_back_after_the_database_was_lost() {
    let c = client().await;
    let pattern = format!("clienttest.back{}.>", std::process::id());
    let application = format!("broadcast_back_{}", std::process::id());
    let broadcast = Broadcast::subscribe(
        connect_no_tls(format!("{} application_name={application}", session_url())),
        &pattern,
    )
    .await
    .unwrap()
    .configure(|consumer| consumer.wait(Duration::from_millis(200)));
    let queue = broadcast.queue().to_string();
    let shutdown = CancellationToken::new();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<i64>();
    let running = tokio::spawn(broadcast.run(
        move |m: Message<Job>| {
            let seen = seen_tx.clone();
            async move {
                seen.send(m.payload.n).unwrap();
                Ok(())
            }
        },
        shutdown.clone(),
    ));
    let subject = pattern.replace('>', "config");
    let published = async |n: i64| {
        publish(&c, &subject, &Job { n }, &SendOptions::new())
            .await
            .unwrap()
    };
    let next = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<i64>| {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("delivered within 10 s")
            .unwrap()
    };
    assert_eq!(published(1).await, 1);
    assert_eq!(next(&mut seen_rx).await, 1);

    c.query_typed("SELECT bussig.drop_queue($1)", &[(&queue, Type::TEXT)])
        .await
        .unwrap();
    assert!(kill_connections(&application).await >= 1);
    eventually("the broadcast queue made again", async || {
        queue_depth(&c, &queue).await.is_ok()
    })
    .await;
    assert_eq!(published(2).await, 1, "the queue is subscribed again");
    assert_eq!(next(&mut seen_rx).await, 2);

    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert!(
        queue_depth(&c, &queue).await.is_err(),
        "{queue} is dropped at shutdown"
    );
}

/// A transactional handler that replies early and works on holds the request's row in its
/// transaction: the lock's extension, due meanwhile, must neither stop the handler (it waited for
/// that row, and the handler could not commit while it waited) nor count the lock as lost.
#[tokio::test]
async fn a_transactional_handler_that_replies_early_is_not_held_up_by_its_lock() {
    let c = client().await;
    let q = TestQueue::create(&c, "early_reply", "lock_timeout => '1 second'").await;
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(connect_no_tls(url()), q.name.clone())
        .lock_timeout(Duration::from_secs(1))
        .wait(Duration::from_millis(200));
    let stats = consumer.stats();
    let running = tokio::spawn(consumer.run_transactional(
        |m: &Message<Job>, tx| {
            Box::pin(async move {
                m.reply_with(tx, &Job { n: -m.payload.n }).await?;
                // Past half the lock twice over, with the reply's row held.
                tokio::time::sleep(Duration::from_millis(2_500)).await;
                Ok(())
            })
        },
        shutdown.clone(),
    ));
    let requester = Requester::start(connect_no_tls(url())).await.unwrap();
    let reply = requester
        .request::<_, Job>(&q.name, &Job { n: 5 }, Duration::from_secs(10))
        .await
        .expect("the reply, committed with the handler's transaction");
    assert_eq!(reply.payload, Job { n: -5 });
    shutdown.cancel();
    running.await.unwrap().unwrap();
    requester.stop().await.unwrap();
    assert_eq!(stats.handled.load(Ordering::Relaxed), 1);
    assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    assert_eq!(stats.locks_lost.load(Ordering::Relaxed), 0);
    assert_eq!(queue_depth(&c, &q.name).await.unwrap(), 0);
}
