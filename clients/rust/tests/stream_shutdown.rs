//! A stream member's shutdown: what was handled is committed, what was not goes back to the group at
//! once, and a handler that does not finish within the grace is dropped.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bussig_client::*;

mod common;
use common::*;

#[tokio::test]
async fn a_shutdown_commits_what_was_handled_and_gives_back_the_rest() {
    let c = client().await;
    let s = TestStream::create(&c, "s_shutdown", 1).await;
    let batch: Vec<_> = (0..20).map(|n| AppendRecord::new(Job { n })).collect();
    append_batch(&c, &s.name, &batch, None).await.unwrap();

    let shutdown = CancellationToken::new();
    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    let (handler_seen, handler_shutdown) = (seen.clone(), shutdown.clone());
    let handler = move |record: StreamRecord| {
        let (seen, shutdown) = (handler_seen.clone(), handler_shutdown.clone());
        async move {
            let job: Job = record.payload_as()?;
            if job.n == 4 {
                shutdown.cancel();
            }
            seen.lock().unwrap().push(job.n);
            Ok(())
        }
    };
    let member = StreamConsumer::new(connect_no_tls(url()), &s.name, "group")
        .max_records(20)
        .wait(Duration::from_millis(200));
    tokio::time::timeout(Duration::from_secs(10), member.run(handler, shutdown))
        .await
        .expect("stops")
        .unwrap();

    assert_eq!(
        *seen.lock().unwrap(),
        [0, 1, 2, 3, 4],
        "the record in hand finished"
    );
    assert_eq!(s.positions(&c).await, [(5, 20)]);
    let rest = stream_read(&c, &s.name, "group", 100, None, LEASE)
        .await
        .unwrap();
    assert_eq!(
        jobs(&rest),
        (5..20).collect::<Vec<_>>(),
        "no lease left behind"
    );
}

/// A handler that never finishes holds a shutdown up only for the grace: it is dropped, the record
/// before it committed, and the partition released at once.
#[tokio::test]
async fn a_shutdown_drops_a_handler_still_running_after_the_grace() {
    let c = client().await;
    let s = TestStream::create(&c, "s_grace", 1).await;
    let batch: Vec<_> = (0..5).map(|n| AppendRecord::new(Job { n })).collect();
    append_batch(&c, &s.name, &batch, None).await.unwrap();

    let shutdown = CancellationToken::new();
    let handler_shutdown = shutdown.clone();
    let handler = move |record: StreamRecord| {
        let shutdown = handler_shutdown.clone();
        async move {
            let job: Job = record.payload_as()?;
            if job.n == 2 {
                shutdown.cancel();
                std::future::pending::<()>().await;
            }
            Ok(())
        }
    };
    let member = StreamConsumer::new(connect_no_tls(url()), &s.name, "group")
        .max_records(5)
        .wait(Duration::from_millis(200))
        .shutdown_grace(Duration::from_millis(300));
    let began = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), member.run(handler, shutdown))
        .await
        .expect("stops after the grace")
        .unwrap();
    assert!(began.elapsed() < Duration::from_secs(5));
    assert_eq!(s.positions(&c).await, [(2, 5)], "0 and 1 committed");
    let rest = stream_read(&c, &s.name, "group", 100, None, LEASE)
        .await
        .unwrap();
    assert_eq!(jobs(&rest), [2, 3, 4], "the partition released at once");
}
