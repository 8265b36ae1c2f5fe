//! Workload 13, faults: a steady stream while consumers lose their backends, the server restarts, and
//! a consumer process is killed. Consumers record each message they ack in a ledger, in the ack's own
//! transaction, so the ledger holds every ack that committed exactly once: after each fault the queue
//! is drained and the ledger checked for messages lost or acked twice.

use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::Client;

use crate::field::{depth_query, POLL};
use crate::pg::{connect_with_backoff, now_us, Res, Samples};
use crate::pressure::{produce, Sent};
use crate::report::{format_value, no_cells, Cell, Section, Target};
use crate::systems::{reset, Consumer, System, QUEUE};
use crate::workloads::index_of;
use crate::Config;

/// The hidden subcommand that runs one consumer process: `bussig-bench --fault-consumer SYSTEM`.
pub const CONSUMER_COMMAND: &str = "--fault-consumer";
/// Messages per second offered, one per transaction.
const RATE: f64 = 600.0;
const CONSUMERS: usize = 8;
/// Short, so that the messages a lost consumer held come back within the drain.
const LOCK_SECONDS: u32 = 5;
/// How the consumers' backends are told apart from the rest in `pg_stat_activity`.
const APPLICATION: &str = "bench_fault_consumer";
const TERMINATE_EVERY: Duration = Duration::from_millis(500);
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// A ledger row per committed ack: the message's sequence number and send time, and when it was acked.
const LEDGER: &str = "CREATE TABLE IF NOT EXISTS bench_ledger (
    seq bigint NOT NULL, sent_us bigint NOT NULL, acked_at timestamptz NOT NULL DEFAULT clock_timestamp())";
const SYSTEMS: [System; 3] = [System::Bussig, System::Hand, System::Pgmq];

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Terminate,
    Restart,
    Kill,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::Terminate => "(1) consumer backends terminated",
            Fault::Restart => "(2) server restarted",
            Fault::Kill => "(3) a consumer process killed",
        }
    }
}

/// The lengths of a cell: the steady state before the fault, how long the terminations go on, how
/// long the load runs on after the fault.
struct Timing {
    steady: Duration,
    terminations: Duration,
    after: Duration,
}

fn arg_name(system: System) -> &'static str {
    match system {
        System::Bussig => "bussig",
        System::Hand => "hand",
        System::Pgmq => "pgmq",
        System::Pgq => "pgq",
    }
}

/// A consumer that acks into the ledger: it reads up to 10 (bussig and pgmq waiting up to a second,
/// the hand-written queue polling) and acks them in one statement that also inserts the ledger rows
/// of just the messages its ack removed.
struct LedgerConsumer {
    system: System,
    consumer: Consumer,
    ack: postgres::Statement,
}

impl LedgerConsumer {
    fn new(client: &mut Client, system: System) -> Res<Self> {
        let wait = (system != System::Hand).then_some(1_000);
        let consumer = Consumer::with_lock(client, system, QUEUE, 10, wait, Some(LOCK_SECONDS))?;
        // bussig.ack is false for a lock that expired and went to another reader: no ledger row.
        let ack = client.prepare(match system {
            System::Bussig => {
                "INSERT INTO bench_ledger (seq, sent_us)
                 SELECT t.seq, t.sent_us
                   FROM unnest($2::bigint[], $3::uuid[], $4::bigint[], $5::bigint[]) AS t(id, token, seq, sent_us)
                  WHERE bussig.ack($1::text, t.id, t.token)"
            }
            System::Hand => {
                "WITH gone AS (DELETE FROM hand.queue WHERE id = ANY($1::bigint[]) RETURNING id)
                 INSERT INTO bench_ledger (seq, sent_us)
                 SELECT t.seq, t.sent_us
                   FROM gone JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS t(id, seq, sent_us) USING (id)"
            }
            System::Pgmq => {
                "WITH gone AS (SELECT d.id FROM pgmq.delete($1::text, $2::bigint[]) AS d(id))
                 INSERT INTO bench_ledger (seq, sent_us)
                 SELECT t.seq, t.sent_us
                   FROM gone JOIN unnest($2::bigint[], $3::bigint[], $4::bigint[]) AS t(id, seq, sent_us) USING (id)"
            }
            System::Pgq => unreachable!("PgQ takes no part in workload 13"),
        })?;
        Ok(LedgerConsumer {
            system,
            consumer,
            ack,
        })
    }

    fn step(&self, client: &mut Client) -> Res<()> {
        let (locked, stamps) = self.consumer.read_stamped(client)?;
        if locked.len() == 0 {
            if self.system == System::Hand {
                std::thread::sleep(POLL);
            }
            return Ok(());
        }
        let seqs: Vec<i64> = stamps.iter().map(|s| s.seq).collect();
        let sent: Vec<i64> = stamps.iter().map(|s| s.sent_us).collect();
        let ids = locked.ids();
        match self.system {
            System::Bussig => {
                let tokens = locked.tokens();
                client.execute(&self.ack, &[&QUEUE, &ids, &tokens, &seqs, &sent])?
            }
            System::Hand => client.execute(&self.ack, &[&ids, &seqs, &sent])?,
            _ => client.execute(&self.ack, &[&QUEUE, &ids, &seqs, &sent])?,
        };
        Ok(())
    }
}

/// What a fault is expected to do to a client: its connection closed, its backend terminated, the
/// server shutting down or starting.
fn caused_by_fault(error: &(dyn Error + Send + Sync + 'static)) -> bool {
    let Some(error) = error.downcast_ref::<postgres::Error>() else {
        return false;
    };
    error.is_closed()
        || error.source().is_some_and(|s| s.is::<std::io::Error>())
        || [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ]
        .iter()
        .any(|code| error.code() == Some(code))
}

static STOPPING: AtomicBool = AtomicBool::new(false);

/// One consumer process of workload 13: consumes into the ledger until its standard input closes,
/// reconnecting with backoff whenever its connection fails, then prints how often it reconnected.
pub fn consumer_process(system: &str) -> Res<()> {
    let system = SYSTEMS
        .into_iter()
        .find(|s| arg_name(*s) == system)
        .ok_or("unknown system")?;
    let url = format!(
        "{} application_name={APPLICATION}",
        std::env::var("BENCH_URL")?
    );
    // The parent closes the pipe to stop us, and so does its death.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        STOPPING.store(true, Ordering::Relaxed);
    });
    let stopping = || STOPPING.load(Ordering::Relaxed);
    let (mut reconnects, mut failures) = (0u32, 0u32);
    let mut reported = HashSet::new();
    while !stopping() {
        let Some(mut client) = connect_with_backoff(&url, &mut failures, stopping) else {
            break;
        };
        let outcome = LedgerConsumer::new(&mut client, system).and_then(|consumer| {
            while !stopping() {
                consumer.step(&mut client)?;
            }
            Ok(())
        });
        if let Err(error) = outcome {
            reconnects += 1;
            // Anything a fault does not explain is a bug of the bench or of the queue: say it once.
            if !caused_by_fault(error.as_ref()) && reported.insert(error.to_string()) {
                eprintln!("fault consumer ({}): {error:?}", arg_name(system));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    println!("{reconnects}");
    Ok(())
}

fn spawn_consumer(system: System) -> Res<Child> {
    Ok(Command::new(std::env::current_exe()?)
        .args([CONSUMER_COMMAND, arg_name(system)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?)
}

/// Stops the consumer processes; returns how often they reconnected in all.
fn stop_consumers(children: Vec<Child>) -> Res<u32> {
    let mut reconnects = 0;
    for mut child in children {
        drop(child.stdin.take());
        let output = child.wait_with_output()?;
        reconnects += String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse::<u32>()
            .unwrap_or(0);
    }
    Ok(reconnects)
}

/// `pg_ctl restart -m fast`, as `bench/run.sh` passes it in `BENCH_RESTART` (it knows the data
/// directory and the server's user); then a new admin connection.
fn restart_server(url: &str, admin: &mut Client) -> Res<()> {
    let command = std::env::var("BENCH_RESTART").map_err(|_| "BENCH_RESTART is not set")?;
    let output = Command::new("bash").args(["-c", &command]).output()?;
    if !output.status.success() {
        return Err(format!(
            "restart failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let back_by = Instant::now() + Duration::from_secs(60);
    let mut failures = 0;
    *admin = connect_with_backoff(url, &mut failures, || Instant::now() > back_by)
        .ok_or("the server did not come back within 60 s")?;
    Ok(())
}

/// Does the fault; returns when it began and when recovery is timed from (the end of the
/// terminations; the start of the others, whose effect outlasts the act).
fn strike(
    cfg: &Config,
    admin: &mut Client,
    system: System,
    fault: Fault,
    timing: &Timing,
    children: &mut [Child],
) -> Res<(i64, i64)> {
    let from_us = now_us();
    match fault {
        Fault::Terminate => {
            let until = Instant::now() + timing.terminations;
            while Instant::now() < until {
                admin.query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                      WHERE application_name = $1 AND datname = current_database()
                      ORDER BY random() LIMIT 1",
                    &[&APPLICATION],
                )?;
                std::thread::sleep(TERMINATE_EVERY);
            }
        }
        Fault::Restart => {
            restart_server(&cfg.url, admin)?;
            return Ok((from_us, from_us));
        }
        Fault::Kill => {
            // Child::kill sends SIGKILL: no chance to finish or roll back anything client-side.
            children[0].kill()?;
            children[0].wait()?;
            children[0] = spawn_consumer(system)?;
            return Ok((from_us, from_us));
        }
    }
    Ok((from_us, now_us()))
}

/// Messages of the queue not yet acked, locked or not.
fn depth(admin: &mut Client, system: System) -> Res<i64> {
    let row = match system {
        // Rows, not the bussig.queues view, whose figures may come from the worker's last count.
        System::Bussig => admin.query_one(
            "SELECT count(*) FROM bussig.message m JOIN bussig.queue q USING (queue_id) WHERE q.name = $1",
            &[&QUEUE],
        )?,
        System::Hand => admin.query_one(depth_query(system), &[])?,
        _ => admin.query_one(depth_query(system), &[&QUEUE])?,
    };
    Ok(row.get(0))
}

/// Waits until every message is acked (expired locks come back after `LOCK_SECONDS`), or
/// `DRAIN_LIMIT`; returns how many were left.
fn drain(admin: &mut Client, system: System) -> Res<i64> {
    let until = Instant::now() + DRAIN_LIMIT;
    loop {
        let left = depth(admin, system)?;
        if left == 0 || Instant::now() > until {
            return Ok(left);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The sequence numbers bussig dead-lettered (taken off its dead-letter queue); none elsewhere.
fn dead_lettered(admin: &mut Client, system: System) -> Res<Vec<i64>> {
    if system != System::Bussig {
        return Ok(Vec::new());
    }
    let queue: Option<String> = admin
        .query_one(
            "SELECT dead_letter_queue FROM bussig.queues WHERE queue = $1",
            &[&QUEUE],
        )?
        .get(0);
    let Some(queue) = queue else {
        return Ok(Vec::new());
    };
    let reader = Consumer::new(admin, system, &queue, 1_000, None)?;
    let mut seqs = Vec::new();
    loop {
        let (locked, stamps) = reader.read_stamped(admin)?;
        if locked.len() == 0 {
            return Ok(seqs);
        }
        seqs.extend(stamps.iter().map(|s| s.seq));
        reader.settle(admin, locked)?;
    }
}

/// The ledger against what the producer sent.
struct Check {
    sent: usize,
    in_doubt: usize,
    in_doubt_acked: usize,
    acked: usize,
    dead: usize,
    twice: usize,
    lost: usize,
    /// Ledger rows of no message sent: a bug of the bench.
    unknown: usize,
    left: i64,
}

impl Check {
    fn clean(&self) -> bool {
        self.lost == 0 && self.twice == 0 && self.unknown == 0
    }

    fn headline(&self) -> String {
        format!(
            "{} lost, {} twice of {} sent",
            self.lost,
            self.twice,
            format_value(self.sent as f64)
        )
    }

    fn summary(&self) -> String {
        format!(
            "{} ({} acked, {} dead-lettered; {} sends in doubt, {} of them acked{}{})",
            self.headline(),
            format_value(self.acked as f64),
            self.dead,
            self.in_doubt,
            self.in_doubt_acked,
            if self.unknown > 0 {
                format!("; {} acks of no send", self.unknown)
            } else {
                String::new()
            },
            if self.left > 0 {
                format!("; {} left after the drain", self.left)
            } else {
                String::new()
            },
        )
    }
}

fn check(sent: &Sent, ledger: &[(i64, i64, i64)], dead: &[i64], left: i64) -> Check {
    let mut times: HashMap<i64, usize> = HashMap::new();
    for (seq, _, _) in ledger {
        *times.entry(*seq).or_default() += 1;
    }
    let dead: HashSet<i64> = dead.iter().copied().collect();
    let doubted: HashSet<i64> = sent.in_doubt.iter().copied().collect();
    let confirmed: HashSet<i64> = sent.confirmed.iter().copied().collect();
    Check {
        sent: sent.confirmed.len(),
        in_doubt: sent.in_doubt.len(),
        in_doubt_acked: doubted.iter().filter(|s| times.contains_key(s)).count(),
        acked: times.len(),
        dead: dead.len(),
        twice: times.values().filter(|n| **n > 1).count(),
        lost: confirmed
            .iter()
            .filter(|s| !times.contains_key(s) && !dead.contains(s))
            .count(),
        unknown: times
            .keys()
            .filter(|s| !confirmed.contains(s) && !doubted.contains(s))
            .count(),
        left,
    }
}

/// Acks per second in the second from `start_us`, from the sorted ack times.
fn rate_at(acked_us: &[i64], start_us: i64) -> f64 {
    let end_us = start_us + 1_000_000;
    (acked_us.partition_point(|t| *t < end_us) - acked_us.partition_point(|t| *t < start_us)) as f64
}

/// Seconds from `from_us` until the rate, once it fell under 90% of `steady`, is back at 90% (the
/// start of the first such second, stepping 100 ms); 0 when it never fell, None when it is not
/// back by `end_us`. Also the lowest rate of a second seen.
fn recovery(acked_us: &[i64], steady: f64, from_us: i64, end_us: i64) -> (Option<f64>, f64) {
    let starts = (from_us..end_us - 1_000_000).step_by(100_000);
    let rates: Vec<(i64, f64)> = starts.map(|t| (t, rate_at(acked_us, t))).collect();
    let lowest = rates.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
    let good = |rate: f64| rate >= 0.9 * steady;
    let Some(dip) = rates.iter().position(|r| !good(r.1)) else {
        return (Some(0.0), lowest);
    };
    let back = rates[dip..].iter().find(|r| good(r.1));
    (back.map(|r| (r.0 - from_us) as f64 / 1e6), lowest)
}

/// One fault against one system: consumers and producer up, the steady state, the fault, the load
/// running on, then the drain and the check.
fn cell(
    cfg: &Config,
    admin: &mut Client,
    system: System,
    fault: Fault,
    timing: &Timing,
) -> Res<(Cell, Check)> {
    reset(admin, system)?;
    admin.batch_execute("TRUNCATE bench_ledger")?;
    let mut children = (0..CONSUMERS)
        .map(|_| spawn_consumer(system))
        .collect::<Res<Vec<_>>>()?;
    let start_us = now_us();
    let running = AtomicBool::new(true);
    let (struck, sent) = std::thread::scope(|scope| {
        let producer = scope.spawn(|| produce(&cfg.url, system, RATE, &running, true));
        std::thread::sleep(timing.steady);
        let struck = strike(cfg, admin, system, fault, timing, &mut children);
        if struck.is_ok() {
            std::thread::sleep(timing.after);
        }
        running.store(false, Ordering::Relaxed);
        let sent = producer.join().expect("producer panicked");
        (struck, sent)
    });
    let end_us = now_us();
    let ((from_us, until_us), sent) = match (struck, sent) {
        (Ok(struck), Ok(sent)) => (struck, sent),
        (Err(error), _) | (_, Err(error)) => {
            stop_consumers(children)?;
            return Err(error);
        }
    };
    let left = drain(admin, system)?;
    let reconnects = stop_consumers(children)?;
    let dead = dead_lettered(admin, system)?;
    let ledger: Vec<(i64, i64, i64)> = admin
        .query(
            "SELECT seq, sent_us, (extract(epoch FROM acked_at) * 1e6)::bigint FROM bench_ledger",
            &[],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let checked = check(&sent, &ledger, &dead, left);
    if !checked.clean() {
        eprintln!(
            "LOST OR DOUBLED: {} {}: {}",
            system.name(),
            fault.label(),
            checked.summary()
        );
    }

    let mut acked_us: Vec<i64> = ledger.iter().map(|r| r.2).collect();
    acked_us.sort_unstable();
    // The steady rate leaves out the first seconds, while consumers connect and the queue fills.
    let steady_from = start_us + (timing.steady.as_micros() as i64) / 4;
    let steady = (acked_us.partition_point(|t| *t < from_us)
        - acked_us.partition_point(|t| *t < steady_from)) as f64
        / ((from_us - steady_from) as f64 / 1e6);
    let (back, lowest) = recovery(&acked_us, steady, until_us, end_us);
    let seconds_after: Vec<String> = (0..12)
        .map(|s| format_value(rate_at(&acked_us, until_us + s * 1_000_000)))
        .collect();
    eprintln!(
        "  {} {}: acks in each second after it: {}",
        system.name(),
        fault.label(),
        seconds_after.join(" ")
    );
    let latencies = Samples::new(
        ledger
            .iter()
            .filter(|r| r.2 >= from_us)
            .map(|r| (r.2 - r.1) as f64 / 1000.0)
            .collect(),
    );
    let mut detail = match back {
        None => "not back at 90%".to_string(),
        Some(seconds) if seconds > 0.0 => String::new(),
        Some(_) => "never under 90%".to_string(),
    };
    let mut add = |text: String| {
        if !detail.is_empty() {
            detail += "; ";
        }
        detail += &text;
    };
    add(format!("steady {} msgs/s", format_value(steady)));
    if fault == Fault::Terminate {
        let during = (acked_us.partition_point(|t| *t < until_us)
            - acked_us.partition_point(|t| *t < from_us)) as f64
            / ((until_us - from_us) as f64 / 1e6);
        add(format!("{:.2}x during the terminations", during / steady));
    }
    // A restart shorter than a second hides in the rates of whole seconds; the gap shows it.
    let after = &acked_us
        [acked_us.partition_point(|t| *t < from_us)..acked_us.partition_point(|t| *t < end_us)];
    let gap = after.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    add(format!(
        "lowest second {} msgs/s, longest gap between acks {} ms; send -> ack p99 {} ms, max {} ms",
        format_value(lowest),
        format_value(gap as f64 / 1000.0),
        format_value(latencies.percentile(99.0)),
        format_value(latencies.percentile(100.0)),
    ));
    add(format!(
        "consumers reconnected {reconnects} times, the producer {}",
        sent.reconnects
    ));
    add(checked.summary());
    let cell = Cell {
        value: back.unwrap_or(f64::NAN),
        detail,
    };
    Ok((cell, checked))
}

/// Workload 13: 600 msgs/s offered to 8 consumer processes; three faults, each after a steady state,
/// each followed by a drain and a check of the ledger.
pub fn faults(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let seconds = |s: u64| Duration::from_secs(s);
    let timing = if cfg.quick {
        Timing {
            steady: seconds(6),
            terminations: seconds(5),
            after: seconds(6),
        }
    } else {
        Timing {
            steady: seconds(20),
            terminations: seconds(60),
            after: seconds(30),
        }
    };
    admin.batch_execute(LEDGER)?;
    let mut section = Section::new(
        "13. Faults: backends terminated, a server restart, a consumer killed",
        "s to 90%",
        &format!(
            "One producer offers {} msgs/s, one `send` per transaction on a fixed schedule, each payload \
             carrying a sequence number; {CONSUMERS} consumer processes (the bench binary run again), one \
             connection each, read up to 10 (bussig `read(queue, 10, lock_timeout => '{LOCK_SECONDS} \
             seconds', wait => '1 second')`, pgmq `read_with_poll` with a {LOCK_SECONDS}-second visibility \
             timeout, the hand-written `UPDATE ... SKIP LOCKED` likewise) and ack them in one statement \
             that inserts the sequence numbers of the messages its ack removed into a ledger table \
             (bussig: `bussig.ack` of each, true only for a lock still held; pgmq: the ids `delete` \
             returns; the hand-written: `DELETE ... RETURNING`), so the ledger holds each committed ack \
             once. Clients reconnect with a backoff of 50 ms to 1 s. Each cell starts from an empty \
             queue: {} s steady, then (1) `pg_terminate_backend` of a random consumer backend every {} ms \
             for {} s, (2) `pg_ctl restart -m fast`, or (3) SIGKILL of a consumer process, started again \
             at once; the load runs on {} s, then the producer stops, the queue is drained and the ledger \
             checked against the sends whose commit the producer saw. The value: seconds from the fault \
             (for (1) its end) until the ack rate of a second is back at 90% of the steady rate, once it \
             fell under it. Then: every sent message acked or dead-lettered, none twice; a send whose \
             connection broke is in doubt, and may have been acked or not.",
            format_value(RATE),
            timing.steady.as_secs(),
            TERMINATE_EVERY.as_millis(),
            timing.terminations.as_secs(),
            timing.after.as_secs()
        ),
    );
    for fault in [Fault::Terminate, Fault::Restart, Fault::Kill] {
        if fault == Fault::Restart && std::env::var("BENCH_RESTART").is_err() {
            eprintln!(
                "workload 13: BENCH_RESTART is not set (bench/run.sh sets it): no restart cell"
            );
            continue;
        }
        let mut cells = no_cells();
        for system in SYSTEMS {
            let (outcome, checked) = cell(cfg, admin, system, fault, &timing)?;
            if system == System::Bussig {
                targets.push(Target {
                    name: format!("faults, {}: none lost", fault.label()),
                    measured: checked.headline(),
                    goal: "0 lost, 0 twice".into(),
                    pass: checked.clean(),
                });
            }
            cells[index_of(system)] = Some(outcome);
        }
        section.add(fault.label(), Some(CONSUMERS), cells);
    }
    Ok(section)
}
