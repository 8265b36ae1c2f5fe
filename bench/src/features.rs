//! Workloads 5 to 7: what bussig does beyond moving messages (reads behind a backlog, routing by
//! subject, long-poll wake), each against whichever peer can do the same.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use postgres::types::Type;
use postgres::Client;

use crate::load::closed_loop;
use crate::pg::{connect, millis, JsonbText, Res, Samples, PAYLOAD};
use crate::report::{format_value, no_cells, only, Cell, Section, Target};
use crate::systems::{ensure_bussig_queue, prefill, reset, Sender, System, QUEUE};
use crate::workloads::{at_least, index_of};
use crate::Config;

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
        (System::Pgq | System::Pgmq, _) => {
            unreachable!("run with bussig and the hand-written queue only")
        }
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
            let mut cells = no_cells();
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
