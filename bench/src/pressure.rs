//! Workload 12, pressure: a steady stream through many long-polling consumers while other sessions
//! hold the database's vacuum horizon back, first one transaction holding a transaction id, then
//! REPEATABLE READ sessions counting the message table over and over. What it asks of a queue: to
//! keep up, at the same latency, without its tables growing. Also the open-loop producer that
//! workload 13 shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::{Client, IsolationLevel};

use crate::field::POLL;
use crate::pg::{connect, connect_with_backoff, now_us, sleep_until, Res, Samples, Stamp};
use crate::report::{format_value, no_cells, Cell, Section, Target};
use crate::systems::{reset, storage_size, Consumer, Sender, System, QUEUE};
use crate::workloads::{at_least, at_most, index_of};
use crate::Config;

/// Messages per second offered, one per transaction.
const RATE: f64 = 800.0;
const CONSUMERS: usize = 32;
const SCANNERS: usize = 4;
const SCAN_EVERY: Duration = Duration::from_millis(100);
/// Connections settle and the queue finds its steady depth before the baseline starts.
const WARMUP: Duration = Duration::from_secs(5);

/// What a producer sent: the sequence numbers whose commit it saw, and those whose send failed
/// with the outcome unknown (the connection went away mid-statement).
#[derive(Default)]
pub struct Sent {
    pub confirmed: Vec<i64>,
    pub in_doubt: Vec<i64>,
    pub reconnects: u32,
}

/// Connections a producer sends on: one commit at a time on each, a slow commit must not hold back
/// the sends due after it.
const SENDING_CONNECTIONS: usize = 4;

/// Sends stamped messages (sequence numbers from 1) at `rate` per second on a fixed schedule, over
/// `SENDING_CONNECTIONS` connections in turn, a late send not pushing the next ones back (open
/// loop), until `running` is cleared. With `reconnect`, a failed send is kept as in doubt and its
/// connection made again with backoff; without, it fails.
pub fn produce(
    url: &str,
    system: System,
    rate: f64,
    running: &AtomicBool,
    reconnect: bool,
) -> Res<Sent> {
    let start = Instant::now();
    let parts: Vec<Res<Sent>> = std::thread::scope(|scope| {
        let lanes: Vec<_> = (0..SENDING_CONNECTIONS)
            .map(|lane| {
                scope.spawn(move || {
                    produce_on_one(url, system, rate, running, reconnect, start, lane)
                })
            })
            .collect();
        lanes
            .into_iter()
            .map(|l| l.join().expect("producer panicked"))
            .collect()
    });
    let mut sent = Sent::default();
    for part in parts {
        let part = part?;
        sent.confirmed.extend(part.confirmed);
        sent.in_doubt.extend(part.in_doubt);
        sent.reconnects += part.reconnects;
    }
    Ok(sent)
}

/// One connection's share of `produce`: every `SENDING_CONNECTIONS`th message, from the `lane`th.
fn produce_on_one(
    url: &str,
    system: System,
    rate: f64,
    running: &AtomicBool,
    reconnect: bool,
    start: Instant,
    lane: usize,
) -> Res<Sent> {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let live = || running.load(Ordering::Relaxed);
    let mut sent = Sent::default();
    let mut failures = 0;
    let mut seq = lane as i64 + 1;
    let mut next = start + interval * lane as u32;
    while live() {
        let mut client = if reconnect {
            match connect_with_backoff(url, &mut failures, || !live()) {
                Some(client) => client,
                None => break,
            }
        } else {
            connect(url)?
        };
        let sender = match Sender::new(&mut client, system, QUEUE, false) {
            Ok(sender) => sender,
            Err(_) if reconnect => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(error) => return Err(error),
        };
        while live() {
            sleep_until(next);
            next += interval * SENDING_CONNECTIONS as u32;
            let outcome = sender.send_text(&mut client, &Stamp::now(seq).payload());
            let this = seq;
            seq += SENDING_CONNECTIONS as i64;
            match outcome {
                Ok(_) => sent.confirmed.push(this),
                Err(_) if reconnect => {
                    sent.in_doubt.push(this);
                    sent.reconnects += 1;
                    break;
                }
                Err(error) => return Err(error),
            }
        }
    }
    Ok(sent)
}

#[derive(Clone, Copy, PartialEq)]
enum Pressure {
    None,
    HeldXid,
    Scans,
}

struct Phase {
    label: String,
    pressure: Pressure,
    length: Duration,
}

/// One phase of one system's run.
struct Measured {
    start_us: i64,
    end_us: i64,
    size_before: i64,
    size_after: i64,
    scans: u64,
}

/// One message as a consumer saw it: when its ack returned, and how long after its send it was
/// read and acked.
struct Delivery {
    sent_us: i64,
    acked_us: i64,
    read_ms: f64,
    ack_ms: f64,
}

fn ms_between(from_us: i64, to_us: i64) -> f64 {
    (to_us - from_us) as f64 / 1000.0
}

/// The table holding a system's messages, the one the scans of phase (b) count.
fn message_table(system: System) -> &'static str {
    match system {
        System::Bussig => "bussig.message",
        System::Hand => "hand.queue",
        System::Pgmq => "pgmq.q_bench",
        System::Pgq => unreachable!("PgQ takes no part in workload 12"),
    }
}

/// A job-queue consumer as in workload 11 (long poll of 10 for bussig and pgmq, the hand-written
/// queue polling), without the work: read, then ack in a second transaction.
fn consume(url: &str, system: System, running: &AtomicBool) -> Res<Vec<Delivery>> {
    let mut client = connect(url)?;
    let wait = (system != System::Hand).then_some(1_000);
    let consumer = Consumer::new(&mut client, system, QUEUE, 10, wait)?;
    let mut seen = Vec::new();
    while running.load(Ordering::Relaxed) {
        let (locked, stamps) = consumer.read_stamped(&mut client)?;
        let read_us = now_us();
        if locked.len() == 0 {
            if system == System::Hand {
                std::thread::sleep(POLL);
            }
            continue;
        }
        consumer.settle(&mut client, locked)?;
        let acked_us = now_us();
        seen.extend(stamps.iter().map(|stamp| Delivery {
            sent_us: stamp.sent_us,
            acked_us,
            read_ms: ms_between(stamp.sent_us, read_us),
            ack_ms: ms_between(stamp.sent_us, acked_us),
        }));
    }
    Ok(seen)
}

/// Counts `table` in a REPEATABLE READ transaction of its own every `SCAN_EVERY`, starting `offset`
/// late; returns how many counts it made.
fn scan(url: &str, table: &str, offset: Duration, running: &AtomicBool) -> Res<u64> {
    let mut client = connect(url)?;
    let count = client.prepare(&format!("SELECT count(*) FROM {table}"))?;
    let mut next = Instant::now() + offset;
    let mut scans = 0;
    while running.load(Ordering::Relaxed) {
        sleep_until(next);
        next += SCAN_EVERY;
        let mut transaction = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .start()?;
        transaction.query_one(&count, &[])?;
        transaction.commit()?;
        scans += 1;
    }
    Ok(scans)
}

fn run_phase(cfg: &Config, admin: &mut Client, system: System, phase: &Phase) -> Res<Measured> {
    let size_before = storage_size(admin, system)?;
    let start_us = now_us();
    let mut scans = 0;
    match phase.pressure {
        Pressure::None => std::thread::sleep(phase.length),
        Pressure::HeldXid => {
            let mut holder = connect(&cfg.url)?;
            let mut transaction = holder
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .start()?;
            // A transaction id and a snapshot, then idle: what a forgotten session holds.
            transaction.query_one("SELECT txid_current()", &[])?;
            std::thread::sleep(phase.length);
            transaction.commit()?;
        }
        Pressure::Scans => {
            let scanning = AtomicBool::new(true);
            scans = std::thread::scope(|scope| -> Res<u64> {
                let scanners: Vec<_> = (0..SCANNERS)
                    .map(|i| {
                        let (url, scanning) = (&cfg.url, &scanning);
                        // Staggered, so that some count is nearly always running.
                        let offset = SCAN_EVERY * i as u32 / SCANNERS as u32;
                        scope.spawn(move || scan(url, message_table(system), offset, scanning))
                    })
                    .collect();
                std::thread::sleep(phase.length);
                scanning.store(false, Ordering::Relaxed);
                let mut total = 0;
                for scanner in scanners {
                    total += scanner.join().expect("scanner panicked")?;
                }
                Ok(total)
            })?;
        }
    }
    let end_us = now_us();
    Ok(Measured {
        start_us,
        end_us,
        size_before,
        size_after: storage_size(admin, system)?,
        scans,
    })
}

/// One system through every phase under one continuous load.
fn run(
    cfg: &Config,
    admin: &mut Client,
    system: System,
    phases: &[Phase],
) -> Res<(Vec<Measured>, Vec<Delivery>)> {
    reset(admin, system)?;
    let running = AtomicBool::new(true);
    std::thread::scope(|scope| {
        let producer = scope.spawn(|| produce(&cfg.url, system, RATE, &running, false));
        let consumers: Vec<_> = (0..CONSUMERS)
            .map(|_| scope.spawn(|| consume(&cfg.url, system, &running)))
            .collect();
        std::thread::sleep(WARMUP);
        let measured: Res<Vec<Measured>> = phases
            .iter()
            .map(|phase| run_phase(cfg, admin, system, phase))
            .collect();
        running.store(false, Ordering::Relaxed);
        producer.join().expect("producer panicked")?;
        let mut deliveries = Vec::new();
        for consumer in consumers {
            deliveries.extend(consumer.join().expect("consumer panicked")?);
        }
        Ok((measured?, deliveries))
    })
}

/// A phase's figures for one system.
struct Figures {
    rate: f64,
    /// Of the messages acked by the end, those sent in the phase, per second.
    sent: f64,
    ack: Samples,
    read: Samples,
    size_ratio: f64,
}

fn figures(measured: &Measured, deliveries: &[Delivery]) -> Figures {
    let within: Vec<&Delivery> = deliveries
        .iter()
        .filter(|d| (measured.start_us..measured.end_us).contains(&d.acked_us))
        .collect();
    let seconds = ms_between(measured.start_us, measured.end_us) / 1000.0;
    let sent = deliveries
        .iter()
        .filter(|d| (measured.start_us..measured.end_us).contains(&d.sent_us))
        .count();
    Figures {
        rate: within.len() as f64 / seconds,
        sent: sent as f64 / seconds,
        ack: Samples::new(within.iter().map(|d| d.ack_ms).collect()),
        read: Samples::new(within.iter().map(|d| d.read_ms).collect()),
        size_ratio: measured.size_after as f64 / measured.size_before as f64,
    }
}

fn mb(bytes: i64) -> String {
    format_value(bytes as f64 / (1024.0 * 1024.0))
}

/// Workload 12: 800 msgs/s offered to 32 long-polling consumers; a baseline, then (a) a transaction
/// holding an xid, a short recovery, then (b) REPEATABLE READ scans of the message table.
pub fn pressure(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let seconds = |d: Duration| format_value(d.as_secs_f64());
    let (baseline, held) = (cfg.pressure_baseline, cfg.pressure_seconds);
    let recovery = (baseline / 3).min(Duration::from_secs(20));
    let phases = [
        Phase {
            label: format!("baseline, {} s", seconds(baseline)),
            pressure: Pressure::None,
            length: baseline,
        },
        Phase {
            label: format!("(a) an xid held {} s", seconds(held)),
            pressure: Pressure::HeldXid,
            length: held,
        },
        Phase {
            label: format!("recovery, {} s", seconds(recovery)),
            pressure: Pressure::None,
            length: recovery,
        },
        Phase {
            label: format!(
                "(b) {SCANNERS} RR count(*) every {} ms, {} s",
                SCAN_EVERY.as_millis(),
                seconds(held)
            ),
            pressure: Pressure::Scans,
            length: held,
        },
    ];
    let mut section = Section::new(
        "12. Pressure: a steady stream while the vacuum horizon is held back",
        "msgs/s",
        &format!(
            "One producer offers {} msgs/s, one `send` per transaction on a fixed schedule (open \
             loop) spread over {SENDING_CONNECTIONS} connections, each payload carrying its send time; \
             {CONSUMERS} consumers, one connection each, loop: take up to 10 (bussig `read(queue, 10, \
             wait => '1 second')`, pgmq `read_with_poll(queue, 30, 10, 1, 10)`, the hand-written \
             `UPDATE ... SKIP LOCKED`, sleeping {} ms when it finds none), then ack them in a second \
             transaction. After {} s of warm-up: a baseline, then (a) a REPEATABLE READ transaction \
             takes a transaction id (`SELECT txid_current()`) and idles, a recovery, then (b) \
             {SCANNERS} sessions each run `SELECT count(*)` of the system's message table \
             (`bussig.message`, `pgmq.q_bench`, `hand.queue`) in a REPEATABLE READ transaction of its \
             own every {} ms. Each row: messages acked per second in the phase; in brackets the rate \
             against the baseline's, the messages sent per second in the phase, the p50 and p99 latency \
             from the send to the ack's return (the baseline also from the send to the read's return), \
             and `pg_total_relation_size` of the system's tables at the phase's end against its start. \
             PgQ takes no part.",
            format_value(RATE),
            POLL.as_millis(),
            WARMUP.as_secs(),
            SCAN_EVERY.as_millis()
        ),
    );
    let systems = [System::Bussig, System::Hand, System::Pgmq];
    let mut results: Vec<(System, Vec<Figures>, Vec<Measured>)> = Vec::new();
    for system in systems {
        let (measured, deliveries) = run(cfg, admin, system, &phases)?;
        let phase_figures = measured.iter().map(|m| figures(m, &deliveries)).collect();
        results.push((system, phase_figures, measured));
    }
    for (p, phase) in phases.iter().enumerate() {
        let mut cells = no_cells();
        for (system, phase_figures, measured) in &results {
            let (now, base, m) = (&phase_figures[p], &phase_figures[0], &measured[p]);
            let mut detail = format!(
                "{:.2}x; sent {}/s; ack p50 {} ms, p99 {} ms",
                now.rate / base.rate,
                format_value(now.sent),
                format_value(now.ack.percentile(50.0)),
                format_value(now.ack.percentile(99.0)),
            );
            if p == 0 {
                detail += &format!(
                    "; read p50 {} ms, p99 {} ms",
                    format_value(now.read.percentile(50.0)),
                    format_value(now.read.percentile(99.0))
                );
            }
            detail += &format!(
                "; size {:.2}x, {} -> {} MB",
                now.size_ratio,
                mb(m.size_before),
                mb(m.size_after)
            );
            if phase.pressure == Pressure::Scans {
                detail += &format!("; {} counts", format_value(m.scans as f64));
            }
            cells[index_of(*system)] = Some(Cell {
                value: now.rate,
                detail,
            });
        }
        section.add(&phase.label, Some(CONSUMERS), cells);
    }
    let of = |system: System| {
        &results
            .iter()
            .find(|(s, _, _)| *s == system)
            .expect("every system ran")
            .1
    };
    let bussig = of(System::Bussig);
    for (p, what) in [(1, "an xid held"), (3, "REPEATABLE READ count(*) scans")] {
        targets.push(at_least(
            format!(
                "pressure, {what}: consume rate vs baseline, {} msgs/s offered",
                format_value(RATE)
            ),
            bussig[p].rate / bussig[0].rate,
            0.95,
        ));
        targets.push(at_most(
            format!("pressure, {what}: table size after vs before"),
            bussig[p].size_ratio,
            2.0,
        ));
    }
    // What a user is left with once the hold is over: the worker rewrites the table back to its live
    // rows when it can take it for a moment, which VACUUM cannot.
    let measured = &results
        .iter()
        .find(|(s, _, _)| *s == System::Bussig)
        .expect("bussig ran")
        .2;
    let (held_phase, recovered) = (&measured[1], &measured[2]);
    targets.push(at_most(
        "pressure, an xid held: table size after the recovery vs before the hold".to_string(),
        recovered.size_after as f64 / held_phase.size_before as f64,
        2.0,
    ));
    let read_p99 = |figures: &[Figures]| figures[0].read.percentile(99.0);
    targets.push(at_most(
        format!(
            "pressure baseline: p99 send -> read vs pgmq, {CONSUMERS} waiting consumers at {} msgs/s",
            format_value(RATE)
        ),
        read_p99(bussig) / read_p99(of(System::Pgmq)),
        1.0,
    ));
    Ok(section)
}
