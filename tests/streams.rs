//! Streams under concurrency: appenders committing in random order and rolling back while group
//! members read; an open appending transaction; leases shared, expiring and waking waiting readers.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use bussig_tests::*;

fn heads(c: &mut Client, stream: &str) -> BTreeMap<i32, i64> {
    c.query(
        "SELECT partition, head_seq FROM bussig.consumer_groups WHERE stream = $1::text AND consumer_group = 'g'",
        &[&stream],
    )
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

#[test]
fn concurrent_appends_are_numbered_contiguously_and_each_read_once_in_key_order() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "stream_prop", "partitions => 4");
    let name = stream.name.clone();
    // Two independent groups: g with three members, h with two.
    const GROUPS: [(&str, u64); 2] = [("g", 3), ("h", 2)];
    for (group, _) in GROUPS {
        create_group(&mut admin, &name, group, "earliest");
    }
    const APPENDERS: u64 = 4;
    const TRANSACTIONS: u64 = 40;
    let committed: Mutex<HashSet<(u64, u64)>> = Mutex::new(HashSet::new());
    // Per group: what its members read, and the member holding each partition's lease now (0: none).
    let seen: Vec<Mutex<Vec<Record>>> = GROUPS.iter().map(|_| Mutex::new(Vec::new())).collect();
    let holders: Vec<Vec<AtomicU64>> = GROUPS
        .iter()
        .map(|_| (0..4).map(|_| AtomicU64::new(0)).collect())
        .collect();
    let overlaps = AtomicU64::new(0);
    let appending = AtomicBool::new(true);
    // What a reader of stream_range has seen: it must never find a record behind its position.
    let behind = AtomicI64::new(0);
    thread::scope(|scope| {
        let mut appenders = Vec::new();
        for producer in 0..APPENDERS {
            let (name, committed) = (&name, &committed);
            appenders.push(scope.spawn(move || {
                let mut c = connect();
                let mut dice = Dice(0x9E37_79B9 + producer * 7919);
                let mut n = 0;
                for _ in 0..TRANSACTIONS {
                    let mut tx = c.transaction().unwrap();
                    let mut mine = Vec::new();
                    for _ in 0..1 + dice.below(3) {
                        n += 1;
                        let key = format!("k{}", dice.below(6));
                        let payload = json!({"producer": producer, "n": n});
                        tx.execute(
                            "SELECT bussig.append($1::text, $2::jsonb, key => $3::text)",
                            &[name, &payload, &key],
                        )
                        .unwrap();
                        mine.push((producer, n));
                        thread::sleep(Duration::from_millis(dice.below(4)));
                    }
                    if dice.below(5) == 0 {
                        tx.rollback().unwrap();
                    } else {
                        tx.commit().unwrap();
                        committed.lock().unwrap().extend(mine);
                    }
                }
            }));
        }
        let members = GROUPS
            .iter()
            .enumerate()
            .flat_map(|(g, &(_, count))| (1..=count).map(move |member| (g, member)));
        for (g, member) in members {
            let group = GROUPS[g].0;
            let (name, seen, holders, overlaps, appending) =
                (&name, &seen[g], &holders[g], &overlaps, &appending);
            let committed = &committed;
            scope.spawn(move || {
                let mut c = connect();
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let records =
                        stream_read(&mut c, name, group, 7, "200 milliseconds", "20 seconds");
                    let partitions: HashSet<i32> = records.iter().map(|r| r.partition).collect();
                    for &p in &partitions {
                        if holders[p as usize].swap(member, Ordering::SeqCst) != 0 {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    seen.lock().unwrap().extend(records.iter().cloned());
                    thread::sleep(Duration::from_millis(3));
                    for &p in &partitions {
                        holders[p as usize].store(0, Ordering::SeqCst);
                    }
                    assert!(
                        commit_all(&mut c, name, group, &records),
                        "a lease was lost"
                    );
                    let done = !appending.load(Ordering::SeqCst)
                        && seen.lock().unwrap().len() >= committed.lock().unwrap().len();
                    if done || Instant::now() > deadline {
                        break;
                    }
                }
            });
        }
        {
            let (name, appending, behind) = (&name, &appending, &behind);
            scope.spawn(move || {
                let mut c = connect();
                let mut next = [1i64; 4];
                let mut last_pass = false;
                loop {
                    let finished = !appending.load(Ordering::SeqCst);
                    for p in 0..4i32 {
                        let seqs: Vec<i64> = c
                            .query(
                                "SELECT seq FROM bussig.stream_range($1::text, $2::int, $3::bigint, 1000)",
                                &[name, &p, &next[p as usize]],
                            )
                            .unwrap()
                            .iter()
                            .map(|row| row.get(0))
                            .collect();
                        for seq in seqs {
                            if seq != next[p as usize] {
                                behind.fetch_add(1, Ordering::SeqCst);
                            }
                            next[p as usize] = seq + 1;
                        }
                    }
                    if last_pass {
                        break;
                    }
                    last_pass = finished;
                    thread::sleep(Duration::from_millis(5));
                }
            });
        }
        for appender in appenders {
            appender.join().unwrap();
        }
        appending.store(false, Ordering::SeqCst);
    });
    let committed = committed.into_inner().unwrap();
    assert!(
        committed.len() > 100,
        "only {} records committed",
        committed.len()
    );
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two members of a group held one partition"
    );
    assert_eq!(
        behind.load(Ordering::SeqCst),
        0,
        "a range reader found a gap it later saw filled"
    );
    let heads = heads(&mut admin, &name);
    for (seen, (group, _)) in seen.into_iter().zip(GROUPS) {
        check_group(group, &seen.into_inner().unwrap(), &committed, &heads);
    }
}

/// What one group read: each committed record once and no rolled-back one, seqs 1..=head in every
/// partition, each producer's records of a key in append order.
fn check_group(
    group: &str,
    seen: &[Record],
    committed: &HashSet<(u64, u64)>,
    heads: &BTreeMap<i32, i64>,
) {
    // Each committed record read exactly once, no rolled-back one.
    let ids: Vec<(u64, u64)> = seen
        .iter()
        .map(|r| {
            (
                r.payload["producer"].as_u64().unwrap(),
                r.payload["n"].as_u64().unwrap(),
            )
        })
        .collect();
    let unique: HashSet<(u64, u64)> = ids.iter().copied().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "group {group}: a record was read twice"
    );
    assert_eq!(
        &unique, committed,
        "group {group}: read records differ from committed ones"
    );
    // Per partition the seqs are exactly 1..=head.
    let mut by_partition: HashMap<i32, Vec<i64>> = HashMap::new();
    for r in seen {
        by_partition.entry(r.partition).or_default().push(r.seq);
    }
    for (&partition, &head) in heads {
        let mut seqs = by_partition.remove(&partition).unwrap_or_default();
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=head).collect::<Vec<_>>(),
            "group {group}, partition {partition}"
        );
    }
    // Per key and producer, seq follows append order.
    let mut order: HashMap<(String, u64), Vec<(i64, u64)>> = HashMap::new();
    for r in seen {
        let producer = r.payload["producer"].as_u64().unwrap();
        order
            .entry((r.key.clone().unwrap(), producer))
            .or_default()
            .push((r.seq, r.payload["n"].as_u64().unwrap()));
    }
    for ((key, producer), mut records) in order {
        records.sort_unstable();
        assert!(
            records.windows(2).all(|w| w[0].1 < w[1].1),
            "group {group}: key {key} of producer {producer} out of order: {records:?}"
        );
    }
}

#[test]
fn an_open_appending_transaction_holds_back_no_reader() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "stream_open", "");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "earliest");
    let mut slow = connect();
    let mut tx = slow.transaction().unwrap();
    tx.execute("SELECT bussig.append($1::text, '\"slow\"')", &[&name])
        .unwrap();
    let mut rolled_back = connect();
    let mut undone = rolled_back.transaction().unwrap();
    undone
        .execute("SELECT bussig.append($1::text, '\"undone\"')", &[&name])
        .unwrap();
    admin
        .execute("SELECT bussig.append($1::text, '\"fast\"')", &[&name])
        .unwrap();
    let mut reader = connect();
    reader
        .batch_execute("SET statement_timeout = '5s'")
        .unwrap();
    let records = stream_read(&mut reader, &name, "g", 10, "0", "30 seconds");
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].seq, records[0].payload.clone()),
        (1, json!("fast"))
    );
    assert!(commit_all(&mut reader, &name, "g", &records));
    undone.rollback().unwrap();
    tx.commit().unwrap();
    let records = stream_read(&mut reader, &name, "g", 10, "0", "30 seconds");
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].seq, records[0].payload.clone()),
        (2, json!("slow"))
    );
}

#[test]
fn members_share_partitions_and_an_expired_lease_moves_to_another_member() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "stream_lease", "partitions => 4");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "earliest");
    append_numbers(&mut admin, &name, 40, true);
    let mut first = connect();
    let mut second = connect();
    let taken = stream_read(&mut first, &name, "g", 5, "0", "1 second");
    assert!(!taken.is_empty());
    let first_partitions: HashSet<i32> = taken.iter().map(|r| r.partition).collect();
    let rest = stream_read(&mut second, &name, "g", 100, "0", "30 seconds");
    let second_partitions: HashSet<i32> = rest.iter().map(|r| r.partition).collect();
    assert!(
        first_partitions.is_disjoint(&second_partitions),
        "{first_partitions:?} {second_partitions:?}"
    );
    assert!(commit_all(&mut second, &name, "g", &rest));
    // The first member goes quiet; once its lease runs out a waiting member gets its records again.
    let started = Instant::now();
    let again = stream_read(&mut second, &name, "g", 100, "10 seconds", "30 seconds");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "waited {waited:?} past the lease's end"
    );
    let again_seqs: Vec<(i32, i64)> = again.iter().map(|r| (r.partition, r.seq)).collect();
    for r in &taken {
        assert!(
            again_seqs.contains(&(r.partition, r.seq)),
            "{r:?} not handed on"
        );
    }
    assert!(
        !commit_all(&mut first, &name, "g", &taken),
        "a stale lease committed"
    );
    assert!(commit_all(&mut second, &name, "g", &again));
    assert_eq!(total_lag(&mut admin, &name), 0);
}

#[test]
fn a_waiting_reader_is_woken_by_the_committing_append() {
    let mut admin = connect();
    let stream = Stream::create(&mut admin, "stream_wake", "");
    let name = stream.name.clone();
    create_group(&mut admin, &name, "g", "latest");
    create_group(&mut admin, &name, "h", "latest");
    thread::scope(|scope| {
        let readers: Vec<_> = ["g", "h"]
            .into_iter()
            .map(|group| {
                let name = &name;
                scope.spawn(move || {
                    let mut c = connect();
                    let started = Instant::now();
                    let records = stream_read(&mut c, name, group, 10, "20 seconds", "30 seconds");
                    (records.len(), started.elapsed())
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(500));
        admin
            .execute("SELECT bussig.append($1::text, '1')", &[&name])
            .unwrap();
        for reader in readers {
            let (count, waited) = reader.join().unwrap();
            assert_eq!(count, 1);
            assert!(waited < Duration::from_secs(5), "woken after {waited:?}");
        }
    });
}

/// A publish to two streams stores its payload once; members waiting in each read it, although it
/// was stored after their calls began.
#[test]
fn waiting_readers_of_two_streams_read_the_payload_a_publish_stored_once() {
    let mut admin = connect();
    let streams = [
        Stream::create(&mut admin, "stream_shared_a", ""),
        Stream::create(&mut admin, "stream_shared_b", ""),
    ];
    let subject = format!("shared.{}", streams[0].name);
    for stream in &streams {
        create_group(&mut admin, &stream.name, "g", "latest");
        admin
            .execute(
                "SELECT bussig.subscribe_stream($1::text, $2::text)",
                &[&stream.name, &subject],
            )
            .unwrap();
    }
    thread::scope(|scope| {
        let readers: Vec<_> = streams
            .iter()
            .map(|stream| {
                let name = &stream.name;
                scope.spawn(move || {
                    stream_read(&mut connect(), name, "g", 10, "20 seconds", "30 seconds")
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(500));
        let reached: i32 = admin
            .query_one(
                "SELECT bussig.publish($1::text, '{\"once\": true}')",
                &[&subject],
            )
            .unwrap()
            .get(0);
        assert_eq!(reached, 2);
        for reader in readers {
            let records = reader.join().unwrap();
            let payloads: Vec<_> = records.iter().map(|r| r.payload.clone()).collect();
            assert_eq!(payloads, [serde_json::json!({"once": true})]);
        }
    });
}

#[test]
fn drop_extension_refuses_while_streams_exist_and_cascade_takes_their_tables() {
    let db = Database::create("stream_drop_ext");
    let mut c = db.connect();
    c.batch_execute(
        "CREATE EXTENSION bussig;
         SELECT bussig.create_stream('events', 2);
         SELECT bussig.append('events', '1');",
    )
    .unwrap();
    let tables = "SELECT count(*) FROM pg_class
                  WHERE relnamespace = 'bussig'::regnamespace AND relname ~ '^stream_[0-9]'
                    AND relkind IN ('r', 'p')";
    let count = |c: &mut Client| -> i64 { c.query_one(tables, &[]).unwrap().get(0) };
    assert_eq!(count(&mut c), 5, "the stream's table and its segments");
    let refused = c.batch_execute("DROP EXTENSION bussig").unwrap_err();
    assert_eq!(refused.code().map(|code| code.code()), Some("2BP01"));
    c.batch_execute("DROP EXTENSION bussig CASCADE").unwrap();
    assert_eq!(
        count(&mut c),
        0,
        "DROP EXTENSION CASCADE left stream tables"
    );
    // A table an earlier install left (as a restored database's stream tables, which record no
    // dependency, are left) does not stop a new stream that draws its id.
    c.batch_execute(
        "CREATE TABLE bussig.stream_1 (left_over int);
         INSERT INTO bussig.stream_1 VALUES (1);
         CREATE EXTENSION bussig;",
    )
    .unwrap();
    let created: bool = c
        .query_one("SELECT bussig.create_stream('again')", &[])
        .unwrap()
        .get(0);
    assert!(created);
    let records: i64 = c
        .query_one(
            "SELECT count(*) FROM bussig.stream_range('again', 0, 1)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(records, 0);
    c.batch_execute("SELECT bussig.append('again', '2')")
        .unwrap();
    let payload: String = c
        .query_one(
            "SELECT payload::text FROM bussig.stream_range('again', 0, 1)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(payload, "2");
}
