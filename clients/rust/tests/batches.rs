//! The calls for whole batches (nack_batch, extend_lock_batch), queue information and backoff, and
//! messages built by hand.
use std::time::Duration;

use bussig_client::*;
use uuid::Uuid;

mod common;
use common::*;

fn held(messages: &[Message]) -> Vec<(i64, Uuid)> {
    messages.iter().map(|m| (m.id, m.lock_token)).collect()
}

#[tokio::test]
async fn nack_batch_gives_back_held_deliveries_and_skips_stale_ones() {
    let c = client().await;
    let q = TestQueue::create(&c, "nackb", "max_deliveries => 2").await;
    send_batch(
        &c,
        &q.name,
        &[Job { n: 1 }, Job { n: 2 }, Job { n: 3 }],
        &SendOptions::new(),
    )
    .await
    .unwrap();
    let first = read(&c, &q.name, 3, None, None).await.unwrap();
    let mut tokens = held(&first);
    tokens.push((first[0].id, Uuid::new_v4()));
    assert_eq!(
        nack_batch(&c, &q.name, &tokens, Some(Duration::ZERO), Some("busy"))
            .await
            .unwrap(),
        3
    );
    assert_eq!(nack_batch(&c, &q.name, &[], None, None).await.unwrap(), 0);
    assert_eq!(states(&c, &q.name).await.len(), 3);

    // The second delivery is the last allowed: a nack dead-letters it.
    let second = read(&c, &q.name, 3, None, None).await.unwrap();
    assert!(second.iter().all(|m| m.delivery_count == 2));
    assert_eq!(
        nack_batch(&c, &q.name, &held(&second), None, Some("again"))
            .await
            .unwrap(),
        3
    );
    assert_eq!(queue_depth(&c, &q.name).await.unwrap(), 0);
    assert_eq!(queue_depth(&c, &q.dlq()).await.unwrap(), 3);
}

#[tokio::test]
async fn extend_lock_batch_returns_the_ids_still_held() {
    let c = client().await;
    let q = TestQueue::create(&c, "extendb", "").await;
    send_batch(
        &c,
        &q.name,
        &[Job { n: 1 }, Job { n: 2 }],
        &SendOptions::new(),
    )
    .await
    .unwrap();
    let batch = read(&c, &q.name, 2, Some(Duration::from_secs(1)), None)
        .await
        .unwrap();
    ack(&c, &q.name, batch[0].id, batch[0].lock_token)
        .await
        .unwrap();
    let still = extend_lock_batch(&c, &q.name, &held(&batch), Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(still, [batch[1].id]);
    // Past the first lock timeout the message is still locked: the extension held.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(read(&c, &q.name, 1, None, None).await.unwrap().is_empty());
    assert!(extend_lock_batch(&c, &q.name, &[], None)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn queues_report_settings_and_counts_and_retry_backoff_follows_them() {
    let c = client().await;
    let q = TestQueue::create(
        &c,
        "info",
        "max_deliveries => 7, lock_timeout => '45 seconds', retry_delay => '2 seconds', \
         retry_multiplier => 3, retry_delay_max => '10 seconds', dedup_window => '1 hour', \
         max_in_flight => 4",
    )
    .await;
    send_batch(
        &c,
        &q.name,
        &[Job { n: 1 }, Job { n: 2 }],
        &SendOptions::new(),
    )
    .await
    .unwrap();
    send(
        &c,
        &q.name,
        &Job { n: 3 },
        &SendOptions::new().delay(Duration::from_secs(600)),
    )
    .await
    .unwrap();
    read(&c, &q.name, 1, None, None).await.unwrap();

    let found = queues(&c, &[q.name.as_str(), "no_such_queue_for_info"])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].messages, 3, "exact at once");
    // The split is the worker's count, about a second old; run its step here too, so that a worker
    // not started yet (right after a server start) cannot make the wait run out.
    c.execute("SELECT bussig.run_maintenance()", &[])
        .await
        .unwrap();
    eventually("the worker's count", async || {
        let info = &queues(&c, &[q.name.as_str()]).await.unwrap()[0];
        (info.ready, info.delayed, info.locked) == (1, 1, 1)
    })
    .await;
    let info = &found[0];
    assert_eq!(info.name, q.name);
    assert_eq!(info.dead_letter_queue.as_deref(), Some(q.dlq().as_str()));
    assert_eq!(info.max_deliveries, 7);
    assert_eq!(info.lock_timeout, Duration::from_secs(45));
    assert_eq!(info.dedup_window, Duration::from_secs(3600));
    assert_eq!(info.message_ttl, None);
    assert_eq!(
        (info.retry_delay, info.retry_delay_max),
        (Duration::from_secs(2), Duration::from_secs(10))
    );
    assert_eq!(info.retry_multiplier, 3.0);
    assert_eq!(info.max_in_flight, Some(4));

    let dlq = &queues(&c, &[q.dlq()]).await.unwrap()[0];
    assert_eq!(dlq.dead_letter_queue, None);
    assert_eq!(dlq.max_in_flight, None);
    assert_eq!(dlq.oldest_ready_age, Duration::ZERO);

    let backoff = |attempt| retry_backoff(&c, &q.name, attempt);
    assert_eq!(backoff(1).await.unwrap(), Duration::from_secs(2));
    assert_eq!(backoff(2).await.unwrap(), Duration::from_secs(6));
    assert_eq!(backoff(3).await.unwrap(), Duration::from_secs(10));
    assert!(matches!(
        retry_backoff(&c, "no_such_queue_for_info", 1).await,
        Err(Error::UnknownQueue(_))
    ));
}

#[test]
fn a_message_built_by_hand_is_a_first_delivery() {
    let token = Uuid::new_v4();
    let mut message = Message::new("orders", 42, token, Job { n: 1 });
    message.headers = Some(serde_json::json!({ "tenant": "acme" }));
    assert_eq!(
        (&*message.queue, message.id, message.lock_token),
        ("orders", 42, token)
    );
    assert_eq!((message.delivery_count, message.priority), (1, 0));
    assert_eq!(message.header("tenant"), Some("acme"));
    assert_eq!(message.payload, Job { n: 1 });
}

#[tokio::test]
async fn subscribers_name_the_queues_a_subject_reaches() {
    let c = client().await;
    let q = TestQueue::create(&c, "subs", "").await;
    let pattern = format!("clientsubs.p{}.*", std::process::id());
    c.query_typed(
        "SELECT bussig.subscribe($1, $2)",
        &[
            (&q.name, tokio_postgres::types::Type::TEXT),
            (&pattern, tokio_postgres::types::Type::TEXT),
        ],
    )
    .await
    .unwrap();
    let subject = pattern.replace('*', "created");
    assert_eq!(
        subscribers(&c, &subject).await.unwrap(),
        [(q.name.clone(), pattern.clone())]
    );
    assert!(subscribers(&c, "clientsubs.nobody")
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        subscribers(&c, "bad..subject").await,
        Err(Error::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn a_group_comes_out_one_message_at_a_time_and_says_its_name() {
    let c = client().await;
    let q = TestQueue::create(&c, "grouped", "").await;
    let grouped = SendOptions::new().group_id("order-7");
    send(&c, &q.name, &Job { n: 1 }, &grouped).await.unwrap();
    send_batch(&c, &q.name, &[Job { n: 2 }, Job { n: 3 }], &grouped)
        .await
        .unwrap();
    send(&c, &q.name, &Job { n: 4 }, &SendOptions::new())
        .await
        .unwrap();
    for n in 1..=3 {
        let got = read(&c, &q.name, 10, None, None).await.unwrap();
        let ours: Vec<&Message> = got
            .iter()
            .filter(|m| m.group_id.as_deref() == Some("order-7"))
            .collect();
        assert_eq!(ours.len(), 1, "one of the group at a time");
        assert_eq!(ours[0].payload["n"], n);
        assert!(ack(&c, &q.name, ours[0].id, ours[0].lock_token)
            .await
            .unwrap());
    }
}
