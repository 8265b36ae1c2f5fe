//! Workload 13, faults: a steady stream while consumers lose their backends, the server restarts, and
//! a consumer process is killed. Consumers record each message they ack in a ledger, in the ack's own
//! transaction, so the ledger holds every ack that committed exactly once: after each fault the queue
//! is drained and the ledger checked for messages lost or acked twice (the consumers and the check
//! are in `ledger.rs`).

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::Client;

use crate::field::depth_query;
use crate::ledger::{
    check, spawn_consumer, stop_consumers, Check, APPLICATION, LEDGER, LOCK_SECONDS, SYSTEMS,
};
use crate::pg::{connect_with_backoff, now_us, Res, Samples};
use crate::pressure::produce;
use crate::report::{format_value, no_cells, Cell, Section, Target};
use crate::systems::{reset, Consumer, System, QUEUE};
use crate::workloads::index_of;
use crate::Config;

/// Messages per second offered, one per transaction.
const RATE: f64 = 600.0;
const CONSUMERS: usize = 8;
const TERMINATE_EVERY: Duration = Duration::from_millis(500);
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

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

/// Acks per second in the second from `start_us`, from the sorted ack times.
fn rate_at(acked_us: &[i64], start_us: i64) -> f64 {
    let end_us = start_us + 1_000_000;
    (acked_us.partition_point(|t| *t < end_us) - acked_us.partition_point(|t| *t < start_us)) as f64
}

/// Seconds from `from_us` until the rate, if it fell under 90% of `steady` in a second starting
/// within a second of `from_us`, is back at 90% (the start of the first such second, stepping
/// 100 ms); 0 when it did not fall, None when it is not back by `end_us`. Also the lowest rate of a
/// second seen. A later dip is the noise of the machine, not the fault's.
fn recovery(acked_us: &[i64], steady: f64, from_us: i64, end_us: i64) -> (Option<f64>, f64) {
    let starts = (from_us..end_us - 1_000_000).step_by(100_000);
    let rates: Vec<(i64, f64)> = starts.map(|t| (t, rate_at(acked_us, t))).collect();
    let lowest = rates.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
    let good = |rate: f64| rate >= 0.9 * steady;
    let in_first_second = |r: &&(i64, f64)| r.0 <= from_us + 1_000_000;
    let Some(dip) = rates
        .iter()
        .take_while(in_first_second)
        .position(|r| !good(r.1))
    else {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Acks at `rate` per second from `from` to `to` seconds, as microseconds.
    fn acks(rate: i64, from: i64, to: i64) -> Vec<i64> {
        (from * rate..to * rate)
            .map(|i| i * 1_000_000 / rate)
            .collect()
    }

    #[test]
    fn recovery_times_a_dip_at_the_fault_and_not_a_later_one() {
        let mut outage = acks(600, 0, 10);
        outage.extend(acks(600, 12, 30));
        let (back, lowest) = recovery(&outage, 600.0, 10_000_000, 30_000_000);
        // Back in the second from 11.9 s: 540 acks, 90%.
        assert!(back.is_some_and(|s| (1.8..=2.0).contains(&s)), "{back:?}");
        assert_eq!(lowest, 0.0);
        let mut late = acks(600, 0, 20);
        late.extend(acks(600, 22, 30));
        assert_eq!(recovery(&late, 600.0, 10_000_000, 30_000_000).0, Some(0.0));
    }
}
