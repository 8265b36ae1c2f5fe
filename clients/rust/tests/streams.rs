//! Streams through bussig-client against a real database: appends and group reads one to one, and
//! `StreamConsumer` (order per key across members, failures, shutdown, leases kept and given back).
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bussig_client::*;

mod common;
use common::*;

#[tokio::test]
async fn appends_are_read_in_order_committed_and_replayed() {
    let mut c = client().await;
    let s = TestStream::create(&c, "s_round", 2).await;

    let options = AppendOptions::new()
        .subject("orders.created")
        .header("h", "v")
        .key("k1");
    let partition = append(&c, &s.name, &Job { n: 1 }, &options).await.unwrap();
    assert!((0..2).contains(&partition), "{partition}");
    let tx = c.transaction().await.unwrap();
    append(&tx, &s.name, &Job { n: 99 }, &options)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let batch = [
        AppendRecord::new(Job { n: 2 }).key("k1"),
        AppendRecord::new(Job { n: 3 })
            .key("k1")
            .subject("orders.paid"),
    ];
    assert_eq!(append_batch(&c, &s.name, &batch, None).await.unwrap(), 2);

    let records = stream_read(&c, &s.name, "group", 10, None, LEASE)
        .await
        .unwrap();
    assert_eq!(
        jobs(&records),
        [1, 2, 3],
        "the rolled-back append is not there"
    );
    let seqs: Vec<i64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert!(records.iter().all(|r| r.partition == partition
        && r.key.as_deref() == Some("k1")
        && r.lease_token == records[0].lease_token
        && r.appended_at <= chrono::Utc::now()));
    assert_eq!(records[0].subject.as_deref(), Some("orders.created"));
    assert_eq!(records[0].header("h"), Some("v"));
    assert_eq!(records[1].subject, None);
    assert_eq!(records[1].headers, None);
    assert_eq!(records[2].subject.as_deref(), Some("orders.paid"));
    assert!(matches!(
        records[0].payload_as::<String>(),
        Err(Error::Payload(_))
    ));
    let leased = stream_read(&c, &s.name, "group", 10, None, LEASE).await;
    assert!(leased.unwrap().is_empty(), "the partition is leased");

    let token = records[0].lease_token;
    assert!(stream_commit(&c, &s.name, "group", partition, 2, token)
        .await
        .unwrap());
    assert!(
        !stream_commit(&c, &s.name, "group", partition, 3, token)
            .await
            .unwrap(),
        "a commit ends the lease"
    );
    let rest = stream_read(&c, &s.name, "group", 10, None, LEASE)
        .await
        .unwrap();
    assert_eq!(jobs(&rest), [3], "read again at once after the commit");
    assert!(
        stream_commit(&c, &s.name, "group", partition, 3, rest[0].lease_token)
            .await
            .unwrap()
    );
    assert!(stream_read(
        &c,
        &s.name,
        "group",
        10,
        Some(Duration::from_millis(100)),
        LEASE
    )
    .await
    .unwrap()
    .is_empty());

    stream_seek(&c, &s.name, "group", partition, 2)
        .await
        .unwrap();
    let replayed = stream_read(&c, &s.name, "group", 10, None, LEASE).await;
    assert_eq!(jobs(&replayed.unwrap()), [2, 3]);
    stream_seek_time(&c, &s.name, "group", chrono::DateTime::UNIX_EPOCH)
        .await
        .unwrap();
    let replayed = stream_read(&c, &s.name, "group", 10, None, LEASE).await;
    assert_eq!(
        jobs(&replayed.unwrap()),
        [1, 2, 3],
        "seeking ended the lease"
    );
    assert_eq!(s.positions(&c).await[partition as usize], (0, 3));
}

#[tokio::test]
async fn a_commit_with_a_lease_another_member_took_over_is_refused() {
    let c = client().await;
    let other = client().await;
    let s = TestStream::create(&c, "s_stale", 1).await;
    append(&c, &s.name, &Job { n: 1 }, &AppendOptions::new())
        .await
        .unwrap();

    let short = Duration::from_millis(200);
    let first = stream_read(&c, &s.name, "group", 10, None, short)
        .await
        .unwrap();
    tokio::time::sleep(short * 2).await;
    let second = stream_read(&other, &s.name, "group", 10, None, LEASE)
        .await
        .unwrap();
    assert_eq!(
        (first.len(), second.len()),
        (1, 1),
        "read again once the lease ran out"
    );
    assert_ne!(first[0].lease_token, second[0].lease_token);

    let stale = stream_commit(&c, &s.name, "group", 0, 1, first[0].lease_token).await;
    assert!(!stale.unwrap());
    assert_eq!(s.positions(&c).await, [(0, 1)]);
    let current = stream_commit(&other, &s.name, "group", 0, 1, second[0].lease_token).await;
    assert!(current.unwrap());
    assert_eq!(s.positions(&c).await, [(1, 1)]);
}

#[tokio::test]
async fn a_lease_is_extended_and_released_by_its_token_only() {
    let c = client().await;
    let other = client().await;
    let s = TestStream::create(&c, "s_lease", 1).await;
    let batch: Vec<_> = (0..3).map(|n| AppendRecord::new(Job { n })).collect();
    append_batch(&c, &s.name, &batch, None).await.unwrap();

    let short = Duration::from_millis(300);
    let first = stream_read(&c, &s.name, "group", 10, None, short)
        .await
        .unwrap();
    let token = first[0].lease_token;
    assert!(stream_extend_lease(&c, &s.name, "group", 0, token, LEASE)
        .await
        .unwrap());
    tokio::time::sleep(short * 2).await;
    let kept = stream_read(&other, &s.name, "group", 10, None, LEASE).await;
    assert!(kept.unwrap().is_empty(), "the extended lease is in force");

    assert!(stream_release(&c, &s.name, "group", 0, token)
        .await
        .unwrap());
    let again = stream_read(&other, &s.name, "group", 10, None, LEASE)
        .await
        .unwrap();
    assert_eq!(
        jobs(&again),
        [0, 1, 2],
        "read again at once, from the start"
    );
    assert_ne!(again[0].lease_token, token);
    let stale_extension = stream_extend_lease(&c, &s.name, "group", 0, token, LEASE).await;
    assert!(!stale_extension.unwrap());
    assert!(!stream_release(&c, &s.name, "group", 0, token)
        .await
        .unwrap());
    assert!(!stream_commit(&c, &s.name, "group", 0, 3, token)
        .await
        .unwrap());
    assert_eq!(
        s.positions(&c).await,
        [(0, 3)],
        "a release moves no position"
    );
    let current = again[0].lease_token;
    assert!(stream_release(&other, &s.name, "group", 0, current)
        .await
        .unwrap());
    assert!(
        !stream_release(&other, &s.name, "group", 0, current)
            .await
            .unwrap(),
        "a release ends the lease"
    );
}

#[tokio::test]
async fn a_handler_slower_than_the_lease_keeps_its_partition_for_the_whole_batch() {
    let c = client().await;
    let other = client().await;
    let s = TestStream::create(&c, "s_slow", 1).await;
    let batch: Vec<_> = (0..5).map(|n| AppendRecord::new(Job { n })).collect();
    append_batch(&c, &s.name, &batch, None).await.unwrap();

    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    let handler_seen = seen.clone();
    let handler = move |record: StreamRecord| {
        let seen = handler_seen.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            seen.lock().unwrap().push(record.payload_as::<Job>()?.n);
            Ok(())
        }
    };
    let shutdown = CancellationToken::new();
    let member = StreamConsumer::new(connect_no_tls(url()), &s.name, "group")
        .lease(Duration::from_secs(1))
        .wait(Duration::from_millis(200));
    let stats = member.stats();
    let started = Instant::now();
    let running = tokio::spawn(member.run(handler, shutdown.clone()));
    eventually("the member handling", async || {
        stats.in_flight.load(Ordering::Relaxed) > 0
    })
    .await;
    let mut polls = 0;
    while seen.lock().unwrap().len() < 5 {
        let read = stream_read(&other, &s.name, "group", 10, None, LEASE).await;
        assert_eq!(jobs(&read.unwrap()), [] as [i64; 0], "after {polls} polls");
        polls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() > Duration::from_millis(1500),
        "the batch outlasted the lease"
    );
    assert!(polls > 10, "{polls}");
    shutdown.cancel();
    running.await.unwrap().unwrap();

    assert_eq!(*seen.lock().unwrap(), [0, 1, 2, 3, 4]);
    assert_eq!(stats.handled.load(Ordering::Relaxed), 5);
    assert_eq!(stats.stale_commits.load(Ordering::Relaxed), 0);
    assert_eq!(*stats.last_error.lock().unwrap(), None);
    assert_eq!(s.positions(&c).await, [(5, 5)]);
}

#[tokio::test]
async fn a_member_releases_at_once_the_partitions_it_handled_nothing_of() {
    let c = client().await;
    let other = client().await;
    let s = TestStream::create(&c, "s_release", 2).await;
    // Without keys, each append goes to the next partition: two records in each.
    for n in 0..4 {
        append(&c, &s.name, &Job { n }, &AppendOptions::new())
            .await
            .unwrap();
    }

    // The first record's handler asks for a shutdown and fails: its partition keeps its lease (a
    // record that fails comes back after it, not at once); the other partition's first record,
    // waiting for the one handler slot, is never started, and its partition is released.
    let shutdown = CancellationToken::new();
    let handler_shutdown = shutdown.clone();
    let handler = move |_: StreamRecord| {
        let shutdown = handler_shutdown.clone();
        async move {
            shutdown.cancel();
            Err(Failure::Error("not now".into()))
        }
    };
    let member = StreamConsumer::new(connect_no_tls(url()), &s.name, "group")
        .concurrency(1)
        .max_records(10)
        .wait(Duration::from_millis(200));
    let stats = member.stats();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), member.run(handler, shutdown))
        .await
        .expect("stops")
        .unwrap();

    assert_eq!(
        (
            stats.handled.load(Ordering::Relaxed),
            stats.failed.load(Ordering::Relaxed),
            stats.stale_commits.load(Ordering::Relaxed),
        ),
        (0, 1, 0)
    );
    let rest = stream_read(&other, &s.name, "group", 10, None, LEASE)
        .await
        .unwrap();
    assert_eq!(rest.len(), 2, "the partition never started is released");
    assert!(
        rest.iter().all(|r| r.partition == rest[0].partition),
        "the failed one keeps its lease: {rest:?}"
    );
    assert!(
        started.elapsed() < LEASE / 3,
        "well before the lease ({:?})",
        started.elapsed()
    );
    assert_eq!(s.positions(&c).await, [(0, 2), (0, 2)]);
}

#[tokio::test]
async fn members_of_a_group_handle_each_key_in_order_and_every_record_once() {
    const KEYS: i64 = 8;
    const PER_KEY: i64 = 30;
    let c = client().await;
    let s = TestStream::create(&c, "s_order", 4).await;
    let append_round = |n: i64| {
        let batch: Vec<_> = (0..KEYS)
            .map(|key| AppendRecord::new(Job { n }).key(format!("key-{key}")))
            .collect();
        let (c, name) = (&c, &s.name);
        async move { append_batch(c, name, &batch, None).await.unwrap() }
    };
    for n in 0..PER_KEY / 2 {
        append_round(n).await;
    }

    let seen: Arc<Mutex<HashMap<String, Vec<i64>>>> = Arc::default();
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let overlaps = Arc::new(AtomicU64::new(0));
    let shutdown = CancellationToken::new();
    let mut members = Vec::new();
    let mut stats = Vec::new();
    for _ in 0..2 {
        let member = StreamConsumer::new(connect_no_tls(url()), &s.name, "group")
            .concurrency(4)
            .max_records(7)
            .wait(Duration::from_millis(200));
        stats.push(member.stats());
        let (seen, busy, overlaps) = (seen.clone(), busy.clone(), overlaps.clone());
        let handler = move |record: StreamRecord| {
            let (seen, busy, overlaps) = (seen.clone(), busy.clone(), overlaps.clone());
            async move {
                let key = record.key.clone().expect("every record has a key");
                let job: Job = record.payload_as()?;
                if !busy.lock().unwrap().insert(key.clone()) {
                    overlaps.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(job.n as u64 % 3)).await;
                seen.lock()
                    .unwrap()
                    .entry(key.clone())
                    .or_default()
                    .push(job.n);
                busy.lock().unwrap().remove(&key);
                Ok(())
            }
        };
        members.push(tokio::spawn(member.run(handler, shutdown.clone())));
    }
    for n in PER_KEY / 2..PER_KEY {
        append_round(n).await;
    }
    let total = (KEYS * PER_KEY) as usize;
    eventually("every record handled", async || {
        seen.lock().unwrap().values().map(Vec::len).sum::<usize>() >= total
    })
    .await;
    shutdown.cancel();
    for member in members {
        member.await.unwrap().unwrap();
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.len(), KEYS as usize);
    for (key, handled) in seen.iter() {
        assert_eq!(*handled, (0..PER_KEY).collect::<Vec<_>>(), "{key}");
    }
    assert_eq!(overlaps.load(Ordering::Relaxed), 0, "one key at a time");
    let handled: u64 = stats
        .iter()
        .map(|s| s.handled.load(Ordering::Relaxed))
        .sum();
    assert_eq!(handled, total as u64, "no record handled twice");
    assert!(stats
        .iter()
        .all(|s| s.stale_commits.load(Ordering::Relaxed) == 0
            && s.failed.load(Ordering::Relaxed) == 0));
    let positions = s.positions(&c).await;
    assert_eq!(positions.len(), 4);
    assert!(
        positions.iter().all(|(committed, head)| committed == head),
        "{positions:?}"
    );
    let heads: i64 = positions.iter().map(|(_, head)| head).sum();
    assert_eq!(heads, KEYS * PER_KEY);
}

#[tokio::test]
async fn a_failed_record_stops_its_partition_and_is_read_again_after_those_before_it_commit() {
    let c = client().await;
    let s = TestStream::create(&c, "s_fail", 1).await;
    let batch: Vec<_> = (0..10).map(|n| AppendRecord::new(Job { n })).collect();
    append_batch(&c, &s.name, &batch, None).await.unwrap();

    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    let failed_once = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
    let handler_seen = seen.clone();
    let handler = move |record: StreamRecord| {
        let (seen, failed_once) = (handler_seen.clone(), failed_once.clone());
        async move {
            let job: Job = record.payload_as()?;
            if job.n == 3 && !failed_once[0].swap(true, Ordering::Relaxed) {
                return Err(Failure::Error("boom".into()));
            }
            if job.n == 6 && !failed_once[1].swap(true, Ordering::Relaxed) {
                panic!("bang");
            }
            seen.lock().unwrap().push(job.n);
            Ok(())
        }
    };
    let shutdown = CancellationToken::new();
    let member = StreamConsumer::new(connect_no_tls(url()), &s.name, "group")
        .wait(Duration::from_millis(200));
    let stats = member.stats();
    let running = tokio::spawn(member.run(handler, shutdown.clone()));
    eventually("every record handled", async || {
        seen.lock().unwrap().len() >= 10
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();

    assert_eq!(*seen.lock().unwrap(), (0..10).collect::<Vec<_>>());
    assert_eq!(stats.failed.load(Ordering::Relaxed), 2);
    assert_eq!(
        stats.last_error.lock().unwrap().as_deref(),
        Some("panic: bang")
    );
    assert_eq!(s.positions(&c).await, [(10, 10)]);
}

#[tokio::test]
async fn hostile_input_maps_to_the_sqlstates_errors() {
    let c = client().await;
    let s = TestStream::create(&c, "s_bad", 2).await;
    let job = Job { n: 1 };
    let plain = AppendOptions::new();
    let token = uuid::Uuid::new_v4();

    let bad_name = append(&c, "no such stream!", &job, &plain).await;
    assert!(
        matches!(bad_name, Err(Error::InvalidArgument(_))),
        "{bad_name:?}"
    );
    let unknown = append(&c, "client_no_such_stream", &job, &plain).await;
    assert!(
        matches!(unknown, Err(Error::UnknownQueue(_))),
        "{unknown:?}"
    );
    let empty_key = append(&c, &s.name, &job, &AppendOptions::new().key("")).await;
    assert!(
        matches!(empty_key, Err(Error::InvalidArgument(_))),
        "{empty_key:?}"
    );
    let bad_subject = append(&c, &s.name, &job, &AppendOptions::new().subject("a..b")).await;
    assert!(
        matches!(bad_subject, Err(Error::InvalidArgument(_))),
        "{bad_subject:?}"
    );

    for (group, max_records, lease) in [
        ("bad group!", 10, LEASE),
        ("group", 0, LEASE),
        ("group", 10, Duration::ZERO),
    ] {
        let read = stream_read(&c, &s.name, group, max_records, None, lease).await;
        assert!(matches!(read, Err(Error::InvalidArgument(_))), "{read:?}");
    }
    let unknown_group = stream_read(&c, &s.name, "nobody", 10, None, LEASE).await;
    assert!(
        matches!(unknown_group, Err(Error::UnknownQueue(_))),
        "{unknown_group:?}"
    );

    for (partition, seq) in [(0, 0), (2, 1), (-1, 1)] {
        let commit = stream_commit(&c, &s.name, "group", partition, seq, token).await;
        assert!(
            matches!(commit, Err(Error::InvalidArgument(_))),
            "{commit:?}"
        );
    }
    let commit = stream_commit(&c, &s.name, "nobody", 0, 1, token).await;
    assert!(matches!(commit, Err(Error::UnknownQueue(_))), "{commit:?}");

    for (group, partition, lease) in [
        ("bad group!", 0, LEASE),
        ("group", 2, LEASE),
        ("group", -1, LEASE),
        ("group", 0, Duration::ZERO),
    ] {
        let extend = stream_extend_lease(&c, &s.name, group, partition, token, lease).await;
        assert!(
            matches!(extend, Err(Error::InvalidArgument(_))),
            "{extend:?}"
        );
        if lease.is_zero() {
            continue;
        }
        let release = stream_release(&c, &s.name, group, partition, token).await;
        assert!(
            matches!(release, Err(Error::InvalidArgument(_))),
            "{release:?}"
        );
    }
    for (stream, group) in [(&*s.name, "nobody"), ("client_no_such_stream", "group")] {
        let extend = stream_extend_lease(&c, stream, group, 0, token, LEASE).await;
        assert!(matches!(extend, Err(Error::UnknownQueue(_))), "{extend:?}");
        let release = stream_release(&c, stream, group, 0, token).await;
        assert!(
            matches!(release, Err(Error::UnknownQueue(_))),
            "{release:?}"
        );
    }
    let never_leased = stream_extend_lease(&c, &s.name, "group", 0, token, LEASE).await;
    assert!(!never_leased.unwrap(), "a token never given is stale");
    assert!(!stream_release(&c, &s.name, "group", 0, token)
        .await
        .unwrap());
    let seek = stream_seek(&c, &s.name, "nobody", 0, 1).await;
    assert!(matches!(seek, Err(Error::UnknownQueue(_))), "{seek:?}");
    let seek = stream_seek_time(&c, "client_no_such_stream", "group", chrono::Utc::now()).await;
    assert!(matches!(seek, Err(Error::UnknownQueue(_))), "{seek:?}");

    let member = StreamConsumer::new(connect_no_tls(url()), &s.name, "nobody");
    let run = member
        .run(|_| async { Ok(()) }, CancellationToken::new())
        .await;
    assert!(matches!(run, Err(Error::UnknownQueue(_))), "{run:?}");
}

/// Records of other partitions are read while one partition's handler runs long, not after it.
#[tokio::test]
async fn a_long_partition_does_not_keep_the_others_from_being_read() {
    let c = client().await;
    let s = TestStream::create(&c, "s_busy", 2).await;
    append(&c, &s.name, &Job { n: 0 }, &AppendOptions::new().key("k0"))
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<(i32, i64)>();
    let handler = move |record: StreamRecord| {
        let started = started_tx.clone();
        async move {
            let job: Job = record.payload_as()?;
            started.send((record.partition, job.n)).unwrap();
            if job.n == 0 {
                tokio::time::sleep(Duration::from_secs(6)).await;
            }
            Ok(())
        }
    };
    let member = StreamConsumer::new(connect_no_tls(url()), &s.name, "group")
        .concurrency(2)
        .wait(Duration::from_secs(5));
    let running = tokio::spawn(member.run(handler, shutdown.clone()));
    let (long_partition, _) = started_rx.recv().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Keys spread over both partitions: some land in the one not in hand.
    for n in 1..=9 {
        let options = AppendOptions::new().key(format!("k{n}"));
        append(&c, &s.name, &Job { n }, &options).await.unwrap();
    }
    let other = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let (partition, _) = started_rx.recv().await.unwrap();
            if partition != long_partition {
                return partition;
            }
        }
    })
    .await;
    assert!(other.is_ok(), "the other partition waited for the long one");
    shutdown.cancel();
    running.await.unwrap().unwrap();
}
