//! Workloads 1 to 7 of the benchmark; the soak (8) and memory (9) are in `soak.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use postgres::types::Type;
use postgres::Client;

use crate::load::{closed_loop, in_turns, Outcome, Setup};
use crate::pg::{connect, millis, JsonbText, Res, Samples, PAYLOAD};
use crate::report::{format_value, only, Cell, Section, Target};
use crate::systems::{
    ack_and_read_step, batch_sender, ensure_bussig_queue, pgq_ticker, pgq_ticker_settings, prefill,
    reset, vacuum, Consumer, Sender, System, QUEUE, SYSTEMS,
};
use crate::Config;

fn rate_cell(outcome: &Outcome) -> Cell {
    let detail = if outcome.drained {
        "queue ran dry before the time was up".into()
    } else {
        String::new()
    };
    Cell {
        value: outcome.rate(),
        detail,
    }
}

/// A row's cells from one outcome per system, in the order of `SYSTEMS`.
fn rate_cells(outcomes: &[Outcome]) -> [Option<Cell>; 3] {
    std::array::from_fn(|index| Some(rate_cell(&outcomes[index])))
}

fn index_of(system: System) -> usize {
    SYSTEMS
        .iter()
        .position(|s| *s == system)
        .expect("known system")
}

fn at_least(name: String, value: f64, goal: f64) -> Target {
    Target {
        name,
        measured: format!("{value:.2}x"),
        goal: format!(">= {goal}x"),
        pass: value >= goal,
    }
}

fn ratio(section: &Section, label: &str, clients: usize, ours: System, peer: System) -> f64 {
    let a = section
        .value(label, Some(clients), ours)
        .unwrap_or(f64::NAN);
    let b = section
        .value(label, Some(clients), peer)
        .unwrap_or(f64::NAN);
    a / b
}

/// Workload 1: one message per transaction, and the cost of bussig's `notify` option.
pub fn sends(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let mut section = Section::new(
        "1. Send, one message per transaction",
        "msgs/s",
        "bussig `send`, an `INSERT` into the hand-written table, PgQ `insert_event`; each an autocommit \
         statement. The notify row sends to a bussig queue created with `notify => true`. The four runs of \
         a row take turns: four slices of a quarter of the time each, in rotation.",
    );
    for &clients in &cfg.clients {
        for system in SYSTEMS {
            reset(admin, system)?;
        }
        ensure_bussig_queue(admin, "bench_notify", true)?;
        let mut setups: Vec<Setup> = SYSTEMS
            .iter()
            .map(|&system| -> Setup {
                Box::new(move |c, _| Ok(Sender::new(c, system, QUEUE, false)?.step()))
            })
            .collect();
        setups.push(Box::new(|c, _| {
            Ok(Sender::new(c, System::Bussig, "bench_notify", false)?.step())
        }));
        let outcomes = in_turns(&cfg.url, clients, cfg.run, &setups)?;
        section.add("send", Some(clients), rate_cells(&outcomes));
        section.add(
            "send, notify => true",
            Some(clients),
            only(System::Bussig, rate_cell(&outcomes[SYSTEMS.len()])),
        );
    }
    for &clients in &cfg.clients {
        targets.push(at_least(
            format!("send vs hand-written INSERT, {clients} client(s)"),
            ratio(&section, "send", clients, System::Bussig, System::Hand),
            0.9,
        ));
    }
    for &clients in &cfg.clients {
        let plain = section
            .value("send", Some(clients), System::Bussig)
            .unwrap_or(f64::NAN);
        let notify = section
            .value("send, notify => true", Some(clients), System::Bussig)
            .unwrap_or(f64::NAN);
        targets.push(at_least(
            format!("send with notify vs without, {clients} client(s)"),
            notify / plain,
            0.9,
        ));
    }
    Ok(section)
}

/// Workload 2: batches of 100 messages in one statement.
pub fn send_batches(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let mut section = Section::new(
        "2. Send a batch of 100 in one transaction",
        "msgs/s",
        "bussig `send_batch` of 100, the hand-written multi-row `INSERT ... SELECT unnest($1::jsonb[])`, \
         PgQ `insert_event` over `unnest` of 100 in one statement. The systems take turns: four slices of \
         a quarter of the time each, in rotation.",
    );
    for &clients in &cfg.clients {
        for system in SYSTEMS {
            reset(admin, system)?;
        }
        let setups: Vec<Setup> = SYSTEMS
            .iter()
            .map(|&system| -> Setup { Box::new(move |c, _| batch_sender(c, system, 100)) })
            .collect();
        let outcomes = in_turns(&cfg.url, clients, cfg.run, &setups)?;
        section.add("send_batch(100)", Some(clients), rate_cells(&outcomes));
    }
    for &clients in &cfg.clients {
        targets.push(at_least(
            format!("send_batch(100) vs multi-row INSERT, {clients} client(s)"),
            ratio(
                &section,
                "send_batch(100)",
                clients,
                System::Bussig,
                System::Hand,
            ),
            0.9,
        ));
    }
    Ok(section)
}

const TWO_TRANSACTIONS: &str = "read 10, ack them in a 2nd transaction";
const ONE_CALL: &str = "bussig ack_and_read(10); peers: 2-transaction consume";

/// Workload 3: draining a pre-filled queue.
pub fn consume(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let mut section = Section::new(
        "3. Consume a pre-filled queue",
        "msgs/s",
        &format!(
            "Each run starts from a fresh queue of {} messages. bussig `read(queue, 10)` then `ack_batch`; the \
             hand-written `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 10) RETURNING` then \
             `DELETE ... WHERE id = ANY($1)`; both two autocommit transactions per batch. PgQ: `next_batch`, \
             `get_batch_events`, `finish_batch` in one transaction, with a tick every 500 events (pgqd's \
             default); a PgQ batch has one reader, so it runs with 1 client only. The second row is bussig's \
             one-call loop against the peers' two-transaction consume (the same peer figures as the first row).",
            format_value(cfg.consume_fill as f64)
        ),
    );
    for &clients in &cfg.clients {
        let mut two = [None, None, None];
        for system in SYSTEMS {
            if system == System::Pgq && clients > 1 {
                continue;
            }
            reset(admin, system)?;
            prefill(admin, system, cfg.consume_fill)?;
            let outcome = closed_loop(&cfg.url, clients, cfg.run, true, |c, _| {
                Ok(Consumer::new(c, system, QUEUE, 10, None)?.step())
            })?;
            two[index_of(system)] = Some(rate_cell(&outcome));
        }
        reset(admin, System::Bussig)?;
        prefill(admin, System::Bussig, cfg.consume_fill)?;
        let outcome = closed_loop(&cfg.url, clients, cfg.run, true, |c, _| {
            ack_and_read_step(c, 10)
        })?;
        let hand = two[index_of(System::Hand)].as_ref().map(|c| Cell {
            value: c.value,
            detail: c.detail.clone(),
        });
        section.add(TWO_TRANSACTIONS, Some(clients), two);
        section.add(
            ONE_CALL,
            Some(clients),
            [Some(rate_cell(&outcome)), hand, None],
        );
    }
    for &clients in &cfg.clients {
        targets.push(at_least(
            format!("consume (read 10 + ack) vs hand-written, {clients} client(s)"),
            ratio(
                &section,
                TWO_TRANSACTIONS,
                clients,
                System::Bussig,
                System::Hand,
            ),
            1.0,
        ));
    }
    for &clients in &cfg.clients {
        targets.push(at_least(
            format!("ack_and_read loop vs hand-written 2-transaction consume, {clients} client(s)"),
            ratio(&section, ONE_CALL, clients, System::Bussig, System::Hand),
            1.6,
        ));
    }
    Ok(section)
}

/// Workload 4: producers at a steady rate and consumers together: end-to-end latency from the commit of a send to
/// the commit of its ack.
pub fn end_to_end(cfg: &Config, admin: &mut Client) -> Res<Section> {
    let mut section = Section::new(
        "4. Producers and consumers together",
        "p50 ms",
        &format!(
            "N producers each send {} msgs/s (one per transaction) while N consumers read up to 10 and ack \
             them; latency runs from the return of the send's commit to the return of the ack's commit. \
             bussig consumers wait with `read(..., wait => '1 second')`; the hand-written consumers poll, \
             sleeping 1 ms when the queue is empty; PgQ has one consumer, polls the same way, and its ticker \
             runs every 10 ms with `ticker_max_lag` 10 ms. Ratio: latency, lower is better.",
            format_value(cfg.e2e_rate_per_producer)
        ),
    );
    for &clients in &cfg.clients {
        let mut cells = [None, None, None];
        for system in SYSTEMS {
            reset(admin, system)?;
            if system == System::Pgq {
                pgq_ticker_settings(admin, "10 milliseconds")?;
            }
            let (rate, latency) = producers_and_consumers(cfg, system, clients)?;
            cells[index_of(system)] = Some(Cell {
                value: latency.percentile(50.0),
                detail: format!(
                    "{} msgs/s, p95 {}, p99 {}",
                    format_value(rate),
                    format_value(latency.percentile(95.0)),
                    format_value(latency.percentile(99.0))
                ),
            });
        }
        section.add("send -> ack latency", Some(clients), cells);
    }
    Ok(section)
}

fn producers_and_consumers(cfg: &Config, system: System, clients: usize) -> Res<(f64, Samples)> {
    let consumers = if system == System::Pgq { 1 } else { clients };
    let producing = AtomicBool::new(true);
    let ticking = AtomicBool::new(system == System::Pgq);
    let (produced, acked) = (AtomicU64::new(0), AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / cfg.e2e_rate_per_producer);
    let duration = cfg.run;
    let (sends, acks) = std::thread::scope(|scope| -> Res<_> {
        let ticker = scope.spawn(|| -> Res<()> {
            if ticking.load(Ordering::Relaxed) {
                pgq_ticker(&cfg.url, Duration::from_millis(10), 100, &ticking)?;
            }
            Ok(())
        });
        let consumer_handles: Vec<_> = (0..consumers)
            .map(|_| {
                let (producing, produced, acked) = (&producing, &produced, &acked);
                scope.spawn(move || -> Res<Vec<(i64, Instant)>> {
                    let mut client = connect(&cfg.url)?;
                    let wait = (system == System::Bussig).then_some(1000);
                    let consumer = Consumer::new(&mut client, system, QUEUE, 10, wait)?;
                    let mut acks = Vec::new();
                    let grace = Instant::now() + duration + Duration::from_secs(5);
                    loop {
                        if !producing.load(Ordering::Relaxed)
                            && acked.load(Ordering::Relaxed) >= produced.load(Ordering::Relaxed)
                        {
                            break;
                        }
                        if Instant::now() > grace {
                            break;
                        }
                        let settled = consumer.consume(&mut client)?;
                        let now = Instant::now();
                        if settled.is_empty() && system != System::Bussig {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        acked.fetch_add(settled.len() as u64, Ordering::Relaxed);
                        acks.extend(settled.into_iter().map(|(id, _)| (id, now)));
                    }
                    Ok(acks)
                })
            })
            .collect();
        let producer_handles: Vec<_> = (0..clients)
            .map(|_| {
                let produced = &produced;
                scope.spawn(move || -> Res<Vec<(i64, Instant)>> {
                    let mut client = connect(&cfg.url)?;
                    let sender = Sender::new(&mut client, system, QUEUE, true)?;
                    let start = Instant::now();
                    let mut next = start;
                    let mut sends = Vec::new();
                    while next < start + duration {
                        crate::pg::sleep_until(next);
                        let id = sender.send(&mut client)?.ok_or("send returned no id")?;
                        sends.push((id, Instant::now()));
                        produced.fetch_add(1, Ordering::Relaxed);
                        next += interval;
                    }
                    Ok(sends)
                })
            })
            .collect();
        let mut sends = HashMap::new();
        for handle in producer_handles {
            sends.extend(handle.join().expect("producer panicked")?);
        }
        producing.store(false, Ordering::Relaxed);
        let mut acks = Vec::new();
        for handle in consumer_handles {
            acks.extend(handle.join().expect("consumer panicked")?);
        }
        ticking.store(false, Ordering::Relaxed);
        ticker.join().expect("ticker panicked")?;
        Ok((sends, acks))
    })?;
    let latencies: Vec<f64> = acks
        .iter()
        .filter_map(|(id, acked_at)| {
            sends
                .get(id)
                .map(|sent_at| millis(acked_at.saturating_duration_since(*sent_at)))
        })
        .collect();
    Ok((
        acks.len() as f64 / duration.as_secs_f64(),
        Samples::new(latencies),
    ))
}

#[derive(Clone, Copy, PartialEq)]
enum Backlog {
    Clean,
    Locked,
    Delayed,
}

impl Backlog {
    fn label(self, size: i64) -> String {
        match self {
            Backlog::Clean => "read 10, clean queue".into(),
            Backlog::Locked => format!("read 10, {} locked ahead", format_value(size as f64)),
            Backlog::Delayed => format!("read 10, {} delayed ahead", format_value(size as f64)),
        }
    }
}

/// Puts `backlog` locked or delayed messages in the queue, then the ready ones behind them.
fn build_backlog(cfg: &Config, admin: &mut Client, system: System, backlog: Backlog) -> Res<()> {
    reset(admin, system)?;
    let n = cfg.backlog;
    match (system, backlog) {
        (_, Backlog::Clean) => {}
        (System::Bussig, Backlog::Locked) => {
            prefill(admin, system, n)?;
            let mut locked = 0i64;
            while locked < n {
                let rows = admin.query(
                    "SELECT message_id FROM bussig.read($1, 1000, lock_timeout => '1 hour')",
                    &[&QUEUE],
                )?;
                if rows.is_empty() {
                    break;
                }
                locked += rows.len() as i64;
            }
        }
        (System::Bussig, Backlog::Delayed) => {
            admin.execute(
                "SELECT count(*) FROM bussig.send_batch($1, array(SELECT $2::text::jsonb FROM generate_series(1, $3::bigint)),
                                                       delay => '1 hour')",
                &[&QUEUE, &PAYLOAD, &n],
            )?;
        }
        // A read with a one-hour visibility timeout leaves exactly this behind.
        (System::Hand, _) => {
            admin.execute(
                "INSERT INTO hand.queue (payload, visible_at)
                 SELECT $1::text::jsonb, now() + interval '1 hour' FROM generate_series(1, $2::bigint)",
                &[&PAYLOAD, &n],
            )?;
        }
        (System::Pgq, _) => unreachable!("PgQ has no locked or delayed messages"),
    }
    prefill(admin, system, cfg.ready)
}

/// Workload 5: reads with locked or delayed messages ahead of the ready ones. Each read runs in a transaction that
/// rolls back, so every read meets the same queue; only the read statement is timed.
pub fn head_of_line(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let mut section = Section::new(
        "5. Head of line",
        "p50 ms",
        &format!(
            "Latency of one read of up to 10 messages with {} ready messages behind {} locked (read with a \
             one-hour lock) or delayed (sent with a one-hour delay) ones, against a clean queue of the same \
             ready messages. Each read runs in a transaction that rolls back; the read statement alone is \
             timed. PgQ has no per-message locks or delays. Ratio: latency, lower is better.",
            format_value(cfg.ready as f64),
            format_value(cfg.backlog as f64)
        ),
    );
    for backlog in [Backlog::Clean, Backlog::Locked, Backlog::Delayed] {
        for &clients in &cfg.subset_clients {
            let mut cells = [None, None, None];
            for system in [System::Bussig, System::Hand] {
                build_backlog(cfg, admin, system, backlog)?;
                let timings = Arc::new(Mutex::new(Vec::new()));
                let outcome = closed_loop(&cfg.url, clients, cfg.run, false, |c, _| {
                    let read = match system {
                        System::Bussig => c.prepare_typed(
                            "SELECT message_id, lock_token, payload FROM bussig.read($1, 10)",
                            &[Type::TEXT],
                        )?,
                        _ => c.prepare_typed(
                            "UPDATE hand.queue SET visible_at = now() + interval '30 seconds'
                              WHERE id IN (SELECT id FROM hand.queue WHERE visible_at <= now()
                                            ORDER BY id LIMIT 10 FOR UPDATE SKIP LOCKED)
                              RETURNING id, payload",
                            &[],
                        )?,
                    };
                    let timings = Arc::clone(&timings);
                    Ok(Box::new(move |c: &mut Client| {
                        let mut transaction = c.transaction()?;
                        let before = Instant::now();
                        let rows = match system {
                            System::Bussig => transaction.query(&read, &[&QUEUE])?,
                            _ => transaction.query(&read, &[])?,
                        };
                        timings
                            .lock()
                            .expect("timings")
                            .push(millis(before.elapsed()));
                        transaction.rollback()?;
                        Ok(rows.len() as u64)
                    }))
                })?;
                let reads = Samples::new(std::mem::take(&mut *timings.lock().expect("timings")));
                cells[index_of(system)] = Some(Cell {
                    value: reads.percentile(50.0),
                    detail: format!(
                        "p99 {}, {} reads/s",
                        format_value(reads.percentile(99.0)),
                        format_value(reads.len() as f64 / outcome.seconds)
                    ),
                });
            }
            section.add(&backlog.label(cfg.backlog), Some(clients), cells);
        }
    }
    for backlog in [Backlog::Locked, Backlog::Delayed] {
        let clients = cfg.subset_clients[0];
        let clean = section.value(
            &Backlog::Clean.label(cfg.backlog),
            Some(clients),
            System::Bussig,
        );
        let slow = section.value(&backlog.label(cfg.backlog), Some(clients), System::Bussig);
        let factor = slow.unwrap_or(f64::NAN) / clean.unwrap_or(f64::NAN);
        targets.push(Target {
            name: format!(
                "{}: p50 vs clean queue, {clients} client(s)",
                backlog.label(cfg.backlog)
            ),
            measured: format!("{factor:.2}x"),
            goal: "<= 2x".into(),
            pass: factor <= 2.0,
        });
    }
    Ok(section)
}

/// Workload 6: publishing to subscribed queues (bussig only: neither peer routes by subject).
pub fn routing(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let mut section = Section::new(
        "6. Publish to subscribed queues",
        "publishes/s",
        "bussig `publish` of one message to a subject subscribed by 1, 3, 10 or 100 queues, then to the 3 with \
         1,000 and 10,000 non-matching subscriptions present (literal and wildcard patterns over 100 other \
         queues). A publish reaching more than `bussig.inline_fanout_limit` (16) queues is written by the \
         background worker after the commit, on the same cores. Neither peer routes by subject.",
    );
    for (subject, queues) in [
        ("fan.one", 1),
        ("fan.three", 3),
        ("fan.ten", 10),
        ("fan.hundred", 100),
    ] {
        for i in 1..=queues {
            admin.execute(
                "SELECT bussig.subscribe($1, $2)",
                &[&format!("route_{i}"), &subject],
            )?;
        }
    }
    let mut noise = 0;
    let plans: [(&str, &str, Option<usize>); 6] = [
        ("fan.one", "publish to 1 queue", None),
        ("fan.three", "publish to 3 queues", None),
        ("fan.ten", "publish to 10 queues", None),
        ("fan.hundred", "publish to 100 queues", None),
        (
            "fan.three",
            "publish to 3, 1,000 other subscriptions",
            Some(1_000),
        ),
        (
            "fan.three",
            "publish to 3, 10,000 other subscriptions",
            Some(10_000),
        ),
    ];
    for (subject, label, subscriptions) in plans {
        if let Some(wanted) = subscriptions {
            while noise < wanted {
                let pattern = match noise % 3 {
                    0 => format!("tenant{noise}.orders.*"),
                    1 => format!("*.event{noise}"),
                    _ => format!("tenant{noise}.>"),
                };
                admin.execute(
                    "SELECT bussig.subscribe($1, $2)",
                    &[&format!("other_{}", noise % 100), &pattern],
                )?;
                noise += 1;
            }
        }
        for &clients in &cfg.subset_clients {
            reset(admin, System::Bussig)?;
            let outcome = closed_loop(&cfg.url, clients, cfg.run, false, |c, _| {
                let publish =
                    c.prepare_typed("SELECT bussig.publish($1, $2)", &[Type::TEXT, Type::JSONB])?;
                Ok(Box::new(move |c: &mut Client| {
                    let delivered: i32 = c
                        .query_one(&publish, &[&subject, &JsonbText(PAYLOAD)])?
                        .get(0);
                    Ok(delivered as u64)
                }))
            })?;
            let publishes = outcome.steps.len() as f64 / outcome.seconds;
            let detail = format!("{} deliveries/s", format_value(outcome.rate()));
            section.add(
                label,
                Some(clients),
                only(
                    System::Bussig,
                    Cell {
                        value: publishes,
                        detail,
                    },
                ),
            );
        }
    }
    reset(admin, System::Bussig)?;
    let clients = cfg.subset_clients[0];
    let bussig = |label: &str| {
        section
            .value(label, Some(clients), System::Bussig)
            .unwrap_or(f64::NAN)
    };
    targets.push(at_least(
        format!("publish with 1,000 other subscriptions vs none, {clients} client(s)"),
        bussig("publish to 3, 1,000 other subscriptions") / bussig("publish to 3 queues"),
        0.8,
    ));
    let cost = bussig("publish to 1 queue") / bussig("publish to 100 queues");
    targets.push(Target {
        name: format!("cost of a publish to 100 queues vs to 1, {clients} client(s)"),
        measured: format!("{cost:.2}x"),
        goal: "<= 5x".into(),
        pass: cost <= 5.0,
    });
    Ok(section)
}

/// Workload 7: how long a reader waiting in `read(..., wait => ...)` takes to return after a send commits.
pub fn wake(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let mut section = Section::new(
        "7. Long-poll wake latency",
        "p50 ms",
        &format!(
            "N pairs of a reader blocked in `bussig.read(queue, 1, wait => '5 seconds')` and a writer that \
             sends one message to that queue 5-15 ms after the reader started waiting, {} times; latency runs \
             from the return of the writer's commit to the return of the read. The peers have no long poll.",
            cfg.wake_samples
        ),
    );
    reset(admin, System::Bussig)?;
    let mut first_run = None;
    for &pairs in &cfg.clients {
        for pair in 0..pairs {
            ensure_bussig_queue(admin, &format!("wake_{pair}"), false)?;
        }
        let samples: Vec<f64> = std::thread::scope(|scope| -> Res<Vec<f64>> {
            let handles: Vec<_> = (0..pairs)
                .map(|pair| {
                    scope.spawn(move || wake_pair(cfg, &format!("wake_{pair}"), pair as u64))
                })
                .collect();
            let mut all = Vec::new();
            for handle in handles {
                all.extend(handle.join().expect("wake pair panicked")?);
            }
            Ok(all)
        })?;
        let samples = Samples::new(samples);
        first_run.get_or_insert((pairs, samples.percentile(50.0), samples.percentile(99.0)));
        let detail = format!(
            "p99 {}, {} wakes",
            format_value(samples.percentile(99.0)),
            samples.len()
        );
        section.add(
            "wake after commit",
            Some(pairs),
            only(
                System::Bussig,
                Cell {
                    value: samples.percentile(50.0),
                    detail,
                },
            ),
        );
    }
    let (first, p50, p99) = first_run.unwrap_or((0, f64::NAN, f64::NAN));
    targets.push(Target {
        name: format!("long-poll wake p50, {first} waiting reader(s)"),
        measured: format!("{p50:.2} ms"),
        goal: "< 5 ms".into(),
        pass: p50 < 5.0,
    });
    targets.push(Target {
        name: format!("long-poll wake p99, {first} waiting reader(s)"),
        measured: format!("{p99:.2} ms"),
        goal: "< 20 ms".into(),
        pass: p99 < 20.0,
    });
    Ok(section)
}

fn wake_pair(cfg: &Config, queue: &str, seed: u64) -> Res<Vec<f64>> {
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let samples = cfg.wake_samples;
    std::thread::scope(|scope| -> Res<Vec<f64>> {
        let reader = scope.spawn(move || -> Res<Vec<(i64, Instant)>> {
            let mut client = connect(&cfg.url)?;
            let read = client.prepare_typed(
                "SELECT message_id, lock_token FROM bussig.read($1, 1, wait => '5 seconds')",
                &[Type::TEXT],
            )?;
            let ack = client.prepare_typed(
                "SELECT bussig.ack($1, $2, $3)",
                &[Type::TEXT, Type::INT8, Type::UUID],
            )?;
            let mut woken = Vec::with_capacity(samples);
            while woken.len() < samples {
                if ready_tx.send(()).is_err() {
                    break;
                }
                let rows = client.query(&read, &[&queue])?;
                let now = Instant::now();
                for row in rows {
                    let id: i64 = row.get(0);
                    let token: uuid::Uuid = row.get(1);
                    woken.push((id, now));
                    client.query_one(&ack, &[&queue, &id, &token])?;
                }
            }
            Ok(woken)
        });
        let mut client = connect(&cfg.url)?;
        let sender = Sender::new(&mut client, System::Bussig, queue, true)?;
        let mut sent = HashMap::new();
        let mut random = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        for _ in 0..samples {
            if ready_rx.recv().is_err() {
                break;
            }
            random = random
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            std::thread::sleep(Duration::from_micros(5_000 + (random >> 33) % 10_000));
            let id = sender.send(&mut client)?.ok_or("send returned no id")?;
            sent.insert(id, Instant::now());
        }
        let woken = reader.join().expect("reader panicked")?;
        Ok(woken
            .iter()
            .filter_map(|(id, at)| {
                sent.get(id)
                    .map(|s| millis(at.saturating_duration_since(*s)))
            })
            .collect())
    })
}

/// Vacuums everything between workloads so autovacuum debt from one does not land on the next.
pub fn settle(admin: &mut Client) -> Res<()> {
    for system in SYSTEMS {
        vacuum(admin, system)?;
    }
    Ok(())
}
