//! Torture: producers (send, send_batch, publish, some transactions rolled back on purpose) and
//! consumers (ack, nack, abandon until the lock runs out, dead_letter, extend_lock, work past the
//! lock) on two queues at once, for `BUSSIG_TORTURE_SECONDS` (45 by default). Then a checker puts
//! together what everyone recorded and proves:
//!
//! - every committed message was acked, is in a dead-letter queue, or is still queued (exactly one);
//! - no rolled-back message was ever delivered or is anywhere;
//! - no message was held by two consumers at the same time;
//! - a message is delivered again only after its lock ran out or a nack gave it back.
//!
//! Every time compared comes from the server's `clock_timestamp()`, the clock bussig itself uses
//! for locks, so the checker needs no tolerance.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use bussig_tests::*;

const PRODUCERS: usize = 3;
const CONSUMERS: usize = 6;
const MAX_DELIVERIES: i32 = 3;
/// The queues' own lock timeouts; consumers also ask for other ones per read.
const QUEUE_LOCK_TIMEOUTS: [&str; 2] = ["1.5 seconds", "1 second"];
const QUEUE_OPTIONS: &str = "max_deliveries => 3, retry_delay => '100 milliseconds', \
                             retry_delay_max => '400 milliseconds'";

/// A small xorshift generator: the test needs variety, not quality, and no extra crate.
struct Rng(u64);

impl Rng {
    fn seeded(stream: u64) -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock before 1970")
            .as_nanos() as u64;
        Rng((nanos ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A message's identity: the queue (index into the test's queues) and its payload key. A publish
/// reaching both queues makes two messages with the same key.
type MessageKey = (usize, String);

/// How one delivery ended, as its consumer saw it.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Left alone: the lock runs out at `lock_end`.
    Abandoned,
    /// ack returned true (autocommit: its commit returned OK).
    Acked,
    /// dead_letter returned true, or a nack on the last allowed delivery moved it.
    DeadLettered,
    /// nack returned true: ready again at `ready_at`.
    Nacked { ready_at: SystemTime },
    /// A settle call returned false: the lock had run out and someone else read it, or the worker
    /// dead-lettered it.
    Lost { call: &'static str },
}

/// One delivery, as its consumer recorded it.
#[derive(Debug, Clone)]
struct Delivery {
    queue: usize,
    id: i64,
    key: String,
    delivery_count: i32,
    consumer: String,
    /// When read locked it: the `clock_timestamp()` read used (its lock end minus its timeout).
    start: SystemTime,
    /// The end of the lock after the last extend_lock that returned true.
    lock_end: SystemTime,
    outcome: Outcome,
}

impl Delivery {
    /// The earliest time another delivery may start; None when none may ever.
    fn next_may_start(&self) -> Option<SystemTime> {
        match &self.outcome {
            Outcome::Acked | Outcome::DeadLettered => None,
            Outcome::Nacked { ready_at } => Some(*ready_at),
            Outcome::Abandoned | Outcome::Lost { .. } => Some(self.lock_end),
        }
    }
}

/// What every thread records.
struct Ledger {
    queues: Vec<String>,
    subject_both: String,
    subject_first: String,
    deadline: Instant,
    /// Messages whose COMMIT returned OK.
    committed: Mutex<Vec<MessageKey>>,
    /// Messages of transactions the producer rolled back.
    rolled_back: Mutex<Vec<MessageKey>>,
    deliveries: Mutex<Vec<Delivery>>,
}

/// Locks without cascading poison: the first panic is the one worth reading.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn seconds_from_env() -> u64 {
    match std::env::var("BUSSIG_TORTURE_SECONDS") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("BUSSIG_TORTURE_SECONDS={s:?} is not a whole number")),
        Err(_) => 45,
    }
}

// ---------------------------------------------------------------------------------------------
// Producers

/// One producer operation's messages, to be recorded once its transaction ended.
struct Outgoing {
    keys: Vec<MessageKey>,
}

fn next_payload(producer: usize, seq: &mut u64) -> (String, serde_json::Value) {
    *seq += 1;
    let key = format!("p{producer}-{seq}");
    let payload = json!({ "key": key, "producer": producer, "seq": *seq });
    (key, payload)
}

/// One send, send_batch or publish on `c`; what it enqueued (if its transaction commits).
fn produce_one(
    c: &mut impl GenericClient,
    ledger: &Ledger,
    producer: usize,
    seq: &mut u64,
    rng: &mut Rng,
    out: &mut Outgoing,
) {
    let queue = rng.below(2) as usize;
    let q = ledger.queues[queue].as_str();
    match rng.below(3) {
        0 => {
            let (key, payload) = next_payload(producer, seq);
            // Some with a short delay, some with a higher priority.
            let delay = *rng.pick(&[None, None, None, Some("200 milliseconds")]);
            let priority = rng.below(3) as i32;
            let sql = "SELECT bussig.send($1::text, $2::jsonb, delay => $3::text::interval, \
                       priority => $4::int)";
            let id: Option<i64> = c
                .query_one(sql, &[&q, &payload, &delay, &priority])
                .unwrap_or_else(|e| panic!("send({q}): {e}"))
                .get(0);
            assert!(id.is_some(), "send without dedup_id returned NULL");
            out.keys.push((queue, key));
        }
        1 => {
            let n = 1 + rng.below(6);
            let (keys, payloads): (Vec<_>, Vec<_>) =
                (0..n).map(|_| next_payload(producer, seq)).unzip();
            let ids = send_batch(c, q, &payloads);
            assert_eq!(
                ids.len(),
                payloads.len(),
                "send_batch returned the wrong number of ids"
            );
            out.keys.extend(keys.into_iter().map(|k| (queue, k)));
        }
        _ => {
            // The first queue subscribes to every subject of the test, the second to one branch.
            let both = rng.below(2) == 0;
            let subject = if both {
                &ledger.subject_both
            } else {
                &ledger.subject_first
            };
            let (key, payload) = next_payload(producer, seq);
            let reached: i32 = c
                .query_one(
                    "SELECT bussig.publish($1::text, $2::jsonb)",
                    &[subject, &payload],
                )
                .unwrap_or_else(|e| panic!("publish({subject}): {e}"))
                .get(0);
            assert_eq!(
                reached,
                if both { 2 } else { 1 },
                "publish({subject}) reached"
            );
            out.keys.push((0, key.clone()));
            if both {
                out.keys.push((1, key));
            }
        }
    }
}

fn produce(ledger: &Ledger, producer: usize) {
    let mut c = connect();
    let mut rng = Rng::seeded(producer as u64);
    let mut seq = 0;
    while Instant::now() < ledger.deadline {
        let mut out = Outgoing { keys: Vec::new() };
        if rng.below(3) == 0 {
            // Several operations in one transaction; about a third of them roll back.
            let mut tx = c.transaction().expect("begin");
            for _ in 0..1 + rng.below(4) {
                produce_one(&mut tx, ledger, producer, &mut seq, &mut rng, &mut out);
            }
            if rng.below(3) == 0 {
                tx.rollback().expect("rollback");
                lock(&ledger.rolled_back).extend(out.keys);
            } else {
                tx.commit().expect("commit");
                lock(&ledger.committed).extend(out.keys);
            }
        } else {
            produce_one(&mut c, ledger, producer, &mut seq, &mut rng, &mut out);
            lock(&ledger.committed).extend(out.keys);
        }
        // Paced so that consumers keep up and redeliveries mix with new messages.
        thread::sleep(Duration::from_millis(40 + rng.below(80)));
    }
}

// ---------------------------------------------------------------------------------------------
// Consumers

/// A delivery being worked on.
struct Held {
    queue: usize,
    id: i64,
    token: Uuid,
    key: String,
    delivery_count: i32,
    start: SystemTime,
    lock_end: SystemTime,
}

/// Reads up to `max` messages of queue `queue`, with their lock start and end from the server.
/// `lock_timeout` None uses the queue's own. A `wait` makes it a long poll.
fn read_timed(
    c: &mut Client,
    ledger: &Ledger,
    queue: usize,
    max: i32,
    lock_timeout: Option<&str>,
    wait: Option<&str>,
) -> Vec<Held> {
    let q = ledger.queues[queue].as_str();
    let timeout = lock_timeout.unwrap_or(QUEUE_LOCK_TIMEOUTS[queue]);
    let mut tx = c.transaction().expect("begin");
    let rows = tx
        .query(
            "SELECT message_id, lock_token, payload ->> 'key', delivery_count \
             FROM bussig.read($1::text, $2::int, $3::text::interval, wait => $4::text::interval)",
            &[&q, &max, &lock_timeout, &wait],
        )
        .unwrap_or_else(|e| panic!("read({q}): {e}"));
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    // read set visible_at = clock_timestamp() + timeout: both ends of the lock, exactly.
    let times: HashMap<i64, (SystemTime, SystemTime)> = tx
        .query(
            "SELECT message_id, visible_at - $2::text::interval, visible_at \
             FROM bussig.message WHERE message_id = ANY ($1)",
            &[&ids, &timeout],
        )
        .expect("lock times of the messages read")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    tx.commit().expect("commit read");
    rows.iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let (start, lock_end) = times[&id];
            Held {
                queue,
                id,
                token: r.get(1),
                key: r.get::<_, Option<String>>(2).expect("payload has a key"),
                delivery_count: r.get(3),
                start,
                lock_end,
            }
        })
        .collect()
}

fn ack_held(c: &mut Client, ledger: &Ledger, h: &Held) -> Outcome {
    if ack(c, &ledger.queues[h.queue], h.id, h.token) {
        Outcome::Acked
    } else {
        Outcome::Lost { call: "ack" }
    }
}

/// nack and, in the same transaction, when the message is ready again.
fn nack_held(c: &mut Client, ledger: &Ledger, h: &Held, delay: Option<&str>) -> Outcome {
    let q = ledger.queues[h.queue].as_str();
    let mut tx = c.transaction().expect("begin");
    let nacked: bool = tx
        .query_one(
            "SELECT bussig.nack($1::text, $2::bigint, $3::uuid, delay => $4::text::interval, \
                                error => 'torture')",
            &[&q, &h.id, &h.token, &delay],
        )
        .unwrap_or_else(|e| panic!("nack({q}, {}): {e}", h.id))
        .get(0);
    let outcome = if !nacked {
        Outcome::Lost { call: "nack" }
    } else {
        // A nack on the last allowed delivery moves the message to the dead-letter queue.
        let row = tx
            .query_one(
                "SELECT m.visible_at, m.queue_id = q.queue_id \
                 FROM bussig.message m, bussig.queue q \
                 WHERE m.message_id = $1 AND q.name = $2",
                &[&h.id, &q],
            )
            .expect("the nacked message");
        if row.get::<_, bool>(1) {
            Outcome::Nacked {
                ready_at: row.get(0),
            }
        } else {
            Outcome::DeadLettered
        }
    };
    tx.commit().expect("commit nack");
    outcome
}

fn dead_letter_held(c: &mut Client, ledger: &Ledger, h: &Held) -> Outcome {
    let q = ledger.queues[h.queue].as_str();
    let moved: bool = c
        .query_one(
            "SELECT bussig.dead_letter($1::text, $2::bigint, $3::uuid, 'torture', 'poison')",
            &[&q, &h.id, &h.token],
        )
        .unwrap_or_else(|e| panic!("dead_letter({q}, {}): {e}", h.id))
        .get(0);
    if moved {
        Outcome::DeadLettered
    } else {
        Outcome::Lost {
            call: "dead_letter",
        }
    }
}

/// extend_lock and, in the same transaction, the new end of the lock; false for a stale token.
fn extend_held(c: &mut Client, ledger: &Ledger, h: &mut Held, timeout: &str) -> bool {
    let q = ledger.queues[h.queue].as_str();
    let mut tx = c.transaction().expect("begin");
    let extended: bool = tx
        .query_one(
            "SELECT bussig.extend_lock($1::text, $2::bigint, $3::uuid, $4::text::interval)",
            &[&q, &h.id, &h.token, &timeout],
        )
        .unwrap_or_else(|e| panic!("extend_lock({q}, {}): {e}", h.id))
        .get(0);
    if extended {
        h.lock_end = tx
            .query_one(
                "SELECT visible_at FROM bussig.message WHERE message_id = $1",
                &[&h.id],
            )
            .expect("the extended message")
            .get(0);
    }
    tx.commit().expect("commit extend_lock");
    extended
}

fn record(ledger: &Ledger, consumer: &str, h: Held, outcome: Outcome) {
    lock(&ledger.deliveries).push(Delivery {
        queue: h.queue,
        id: h.id,
        key: h.key,
        delivery_count: h.delivery_count,
        consumer: consumer.to_string(),
        start: h.start,
        lock_end: h.lock_end,
        outcome,
    });
}

/// Does something with one delivery, as a consumer with a random temper would.
fn handle(c: &mut Client, ledger: &Ledger, rng: &mut Rng, h: &mut Held) -> Outcome {
    match rng.below(100) {
        0..=54 => {
            thread::sleep(Duration::from_millis(rng.below(20)));
            ack_held(c, ledger, h)
        }
        55..=69 => {
            let delay = *rng.pick(&[None, Some("0 seconds"), Some("300 milliseconds")]);
            nack_held(c, ledger, h, delay)
        }
        70..=79 => Outcome::Abandoned,
        80..=84 => dead_letter_held(c, ledger, h),
        85..=95 => {
            // Long work: keep the lock alive, then finish.
            for _ in 0..1 + rng.below(2) {
                if !extend_held(c, ledger, h, "1 second") {
                    return Outcome::Lost {
                        call: "extend_lock",
                    };
                }
                thread::sleep(Duration::from_millis(100 + rng.below(300)));
            }
            ack_held(c, ledger, h)
        }
        _ => {
            // Work past the lock without extending it: the ack may still win, or find it taken.
            thread::sleep(Duration::from_millis(900 + rng.below(700)));
            ack_held(c, ledger, h)
        }
    }
}

fn consume(ledger: &Ledger, consumer: usize) {
    let name = format!("c{consumer}");
    let mut c = connect();
    let mut rng = Rng::seeded(100 + consumer as u64);
    while Instant::now() < ledger.deadline {
        let queue = rng.below(2) as usize;
        let max = 1 + rng.below(4) as i32;
        let lock_timeout = *rng.pick(&[None, None, Some("1 second"), Some("2 seconds")]);
        let wait = *rng.pick(&[None, None, Some("300 milliseconds")]);
        let batch = read_timed(&mut c, ledger, queue, max, lock_timeout, wait);
        if batch.is_empty() {
            thread::sleep(Duration::from_millis(10 + rng.below(20)));
        }
        for mut h in batch {
            let outcome = handle(&mut c, ledger, &mut rng, &mut h);
            record(ledger, &name, h, outcome);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The checker

/// Where each message of the test's queues and their dead-letter queues is right now:
/// `(queue index, in its dead-letter queue, message id, key)`, in one snapshot.
fn snapshot(c: &mut Client, ledger: &Ledger) -> Vec<(usize, bool, i64, String)> {
    let mut names = Vec::new();
    for q in &ledger.queues {
        names.push(q.clone());
        names.push(format!("{q}_dlq"));
    }
    c.query(
        "SELECT q.name, m.message_id, coalesce(m.payload, b.payload) ->> 'key' \
         FROM bussig.message m JOIN bussig.queue q USING (queue_id) \
         LEFT JOIN bussig.body b USING (body_id) \
         WHERE q.name = ANY ($1)",
        &[&names],
    )
    .expect("snapshot of the queues")
    .iter()
    .map(|r| {
        let name: String = r.get(0);
        let index = names
            .iter()
            .position(|n| *n == name)
            .expect("a queue of the test");
        (
            index / 2,
            index % 2 == 1,
            r.get(1),
            r.get::<_, Option<String>>(2).expect("key"),
        )
    })
    .collect()
}

/// Every committed message is in exactly one place: acked, dead-lettered, or still queued; nothing
/// else is anywhere. `queued_allowed` is false once the queues were drained.
fn check_accounting(
    ledger: &Ledger,
    deliveries: &[Delivery],
    places: &[(usize, bool, i64, String)],
    queued_allowed: bool,
    problems: &mut Vec<String>,
) {
    let committed: BTreeSet<MessageKey> = lock(&ledger.committed).iter().cloned().collect();
    let rolled_back: BTreeSet<MessageKey> = lock(&ledger.rolled_back).iter().cloned().collect();
    let acked: BTreeSet<MessageKey> = deliveries
        .iter()
        .filter(|d| d.outcome == Outcome::Acked)
        .map(|d| (d.queue, d.key.clone()))
        .collect();

    // (queue, key) -> where it was found.
    let mut found: BTreeMap<MessageKey, Vec<String>> = BTreeMap::new();
    for key in &acked {
        found.entry(key.clone()).or_default().push("acked".into());
    }
    for (queue, dead, id, key) in places {
        let place = if *dead {
            format!("in {}_dlq as id {id}", ledger.queues[*queue])
        } else {
            format!("queued in {} as id {id}", ledger.queues[*queue])
        };
        if !*dead && !queued_allowed {
            problems.push(format!("{key} is still {place} after the drain"));
        }
        found.entry((*queue, key.clone())).or_default().push(place);
    }
    for (key, places) in &found {
        if rolled_back.contains(key) {
            problems.push(format!("rolled-back message {key:?} was found: {places:?}"));
        } else if !committed.contains(key) {
            problems.push(format!(
                "message {key:?} was never committed, yet found: {places:?}"
            ));
        }
        if places.len() > 1 {
            problems.push(format!(
                "message {key:?} is in more than one place: {places:?}"
            ));
        }
    }
    for key in &committed {
        if !found.contains_key(key) {
            problems.push(format!(
                "committed message {key:?} was lost: not acked, not dead-lettered, not queued"
            ));
        }
    }
}

/// Per message: one key, delivery counts 1, 2, 3 ... without gaps, no two deliveries at once, and
/// a new delivery only after the previous one's lock ran out or a nack gave the message back.
fn check_deliveries(ledger: &Ledger, deliveries: &[Delivery], problems: &mut Vec<String>) {
    let committed: BTreeSet<MessageKey> = lock(&ledger.committed).iter().cloned().collect();
    let rolled_back: BTreeSet<MessageKey> = lock(&ledger.rolled_back).iter().cloned().collect();
    let mut by_message: BTreeMap<(usize, i64), Vec<&Delivery>> = BTreeMap::new();
    let mut ids_of_key: BTreeMap<MessageKey, BTreeSet<i64>> = BTreeMap::new();
    for d in deliveries {
        let key = (d.queue, d.key.clone());
        if rolled_back.contains(&key) {
            problems.push(format!("rolled-back message {key:?} was delivered: {d:?}"));
        } else if !committed.contains(&key) {
            problems.push(format!(
                "message {key:?} was delivered but never committed: {d:?}"
            ));
        }
        if d.start >= d.lock_end {
            problems.push(format!("delivery whose lock ends before it starts: {d:?}"));
        }
        ids_of_key.entry(key).or_default().insert(d.id);
        by_message.entry((d.queue, d.id)).or_default().push(d);
    }
    for (key, ids) in &ids_of_key {
        if ids.len() > 1 {
            problems.push(format!(
                "message {key:?} was enqueued more than once, as ids {ids:?}"
            ));
        }
    }
    for ((queue, id), mut list) in by_message {
        list.sort_by_key(|d| (d.start, d.delivery_count));
        let counts: Vec<i32> = list.iter().map(|d| d.delivery_count).collect();
        if counts != (1..=list.len() as i32).collect::<Vec<_>>() {
            problems.push(format!(
                "message {id} of {}: delivery counts in delivery order are {counts:?}",
                ledger.queues[queue]
            ));
        }
        if counts.iter().any(|&n| n > MAX_DELIVERIES) {
            problems.push(format!(
                "message {id} was delivered more than max_deliveries = {MAX_DELIVERIES} times"
            ));
        }
        for pair in list.windows(2) {
            let (before, after) = (pair[0], pair[1]);
            if before.key != after.key {
                problems.push(format!(
                    "message {id} changed its key: {before:?} then {after:?}"
                ));
            }
            match before.next_may_start() {
                None => problems.push(format!(
                    "message {id} was delivered again after it was {:?}:\n  {before:?}\n  {after:?}",
                    before.outcome
                )),
                Some(free) if after.start < free => problems.push(format!(
                    "message {id} was held by {} and {} at once: the next delivery started \
                     {:?} before the previous one let go:\n  {before:?}\n  {after:?}",
                    before.consumer,
                    after.consumer,
                    free.duration_since(after.start).unwrap_or_default()
                )),
                Some(_) => {}
            }
        }
    }
}

/// The shortest time between a message becoming free and its next delivery: shows how tight the
/// "never held twice" check was.
fn closest_handover(deliveries: &[Delivery]) -> Option<Duration> {
    let mut by_message: BTreeMap<(usize, i64), Vec<&Delivery>> = BTreeMap::new();
    for d in deliveries {
        by_message.entry((d.queue, d.id)).or_default().push(d);
    }
    by_message
        .values_mut()
        .flat_map(|list| {
            list.sort_by_key(|d| d.start);
            list.windows(2)
                .filter_map(|p| p[1].start.duration_since(p[0].next_may_start()?).ok())
                .collect::<Vec<_>>()
        })
        .min()
}

fn assert_no_problems(stage: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{stage}: {} problems, the first ones:\n{}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Reads and acks everything left in the test's queues, waiting for locks and delays to run out.
fn drain(c: &mut Client, ledger: &Ledger) {
    eventually(Duration::from_secs(30), "the queues to drain", || {
        for queue in 0..ledger.queues.len() {
            for h in read_timed(c, ledger, queue, 100, None, Some("200 milliseconds")) {
                let outcome = ack_held(c, ledger, &h);
                record(ledger, "drain", h, outcome);
            }
        }
        let left = snapshot(c, ledger)
            .iter()
            .filter(|(_, dead, _, _)| !dead)
            .count();
        (left == 0).then_some(())
    });
}

#[test]
fn torture() {
    let seconds = seconds_from_env();
    let mut client = connect();
    let first = Queue::create(
        &mut client,
        "torture_a",
        &format!(
            "lock_timeout => '{}', {QUEUE_OPTIONS}",
            QUEUE_LOCK_TIMEOUTS[0]
        ),
    );
    let second = Queue::create(
        &mut client,
        "torture_b",
        &format!(
            "lock_timeout => '{}', {QUEUE_OPTIONS}",
            QUEUE_LOCK_TIMEOUTS[1]
        ),
    );
    let prefix = unique_name("torture");
    for (queue, pattern) in [
        (&first, format!("{prefix}.>")),
        (&second, format!("{prefix}.both.*")),
    ] {
        client
            .execute(
                "SELECT bussig.subscribe($1::text, $2::text)",
                &[&queue.name, &pattern],
            )
            .expect("subscribe");
    }
    let ledger = Ledger {
        queues: vec![first.name.clone(), second.name.clone()],
        subject_both: format!("{prefix}.both.x"),
        subject_first: format!("{prefix}.first"),
        deadline: Instant::now() + Duration::from_secs(seconds),
        committed: Mutex::default(),
        rolled_back: Mutex::default(),
        deliveries: Mutex::default(),
    };

    thread::scope(|s| {
        for p in 0..PRODUCERS {
            let ledger = &ledger;
            s.spawn(move || produce(ledger, p));
        }
        for n in 0..CONSUMERS {
            let ledger = &ledger;
            s.spawn(move || consume(ledger, n));
        }
    });

    // Everyone stopped: where everything is now, before the drain moves anything.
    let places = snapshot(&mut client, &ledger);
    let mut problems = Vec::new();
    let deliveries = lock(&ledger.deliveries).clone();
    check_accounting(&ledger, &deliveries, &places, true, &mut problems);
    assert_no_problems("when the load stopped", &problems);

    drain(&mut client, &ledger);
    let places = snapshot(&mut client, &ledger);
    let deliveries = lock(&ledger.deliveries).clone();
    check_accounting(&ledger, &deliveries, &places, false, &mut problems);
    check_deliveries(&ledger, &deliveries, &mut problems);
    assert_no_problems("after the drain", &problems);

    // The run must have exercised what it claims to check.
    let committed = lock(&ledger.committed).len();
    let rolled_back = lock(&ledger.rolled_back).len();
    let count = |f: &dyn Fn(&Delivery) -> bool| deliveries.iter().filter(|d| f(d)).count();
    let redelivered = count(&|d| d.delivery_count > 1);
    let abandoned = count(&|d| d.outcome == Outcome::Abandoned);
    let nacked = count(&|d| matches!(d.outcome, Outcome::Nacked { .. }));
    let lost = count(&|d| matches!(d.outcome, Outcome::Lost { .. }));
    let dead = places.iter().filter(|(_, dead, _, _)| *dead).count();
    eprintln!(
        "torture: {seconds} s, {committed} messages committed, {rolled_back} rolled back, {} \
         deliveries ({redelivered} redeliveries, {abandoned} abandoned, {nacked} nacked, {lost} \
         settles too late), {dead} dead letters; closest handover {:?}",
        deliveries.len(),
        closest_handover(&deliveries)
    );
    if seconds >= 20 {
        assert!(
            committed > 500 && rolled_back > 0,
            "too little load to prove anything"
        );
        assert!(
            redelivered > 0 && abandoned > 0 && nacked > 0 && dead > 0,
            "the run did not exercise redelivery, lock expiry, nack and dead letters"
        );
    }
}
