//! Workloads 1 to 4 of the benchmark and the helpers of every workload; 5 to 7 are in `features.rs`,
//! the soak (8) and memory (9) in `soak.rs`, 10 and 11 in `field.rs`, 12 in `pressure.rs`, 13 in
//! `faults.rs` and `ledger.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use postgres::Client;

use crate::load::{closed_loop, in_turns, Outcome, Setup};
use crate::pg::{connect, millis, Res, Samples};
use crate::report::{format_value, no_cells, only, Cell, Cells, Section, Target};
use crate::systems::{
    ack_and_read_step, batch_sender, ensure_bussig_queue, pgq_ticker, pgq_ticker_settings, prefill,
    reset, vacuum, Consumer, Sender, System, QUEUE, SYSTEMS, WITHOUT_PGMQ,
};
use crate::Config;

pub fn rate_cell(outcome: &Outcome) -> Cell {
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
fn rate_cells(outcomes: &[Outcome]) -> Cells {
    std::array::from_fn(|index| Some(rate_cell(&outcomes[index])))
}

pub fn index_of(system: System) -> usize {
    SYSTEMS
        .iter()
        .position(|s| *s == system)
        .expect("known system")
}

pub fn at_least(name: String, value: f64, goal: f64) -> Target {
    Target {
        name,
        measured: format!("{value:.2}x"),
        goal: format!(">= {goal}x"),
        pass: value >= goal,
    }
}

/// A target on a ratio that should stay low (a size's growth, a latency against a peer's).
pub fn at_most(name: String, value: f64, goal: f64) -> Target {
    Target {
        name,
        measured: format!("{value:.2}x"),
        goal: format!("<= {goal}x"),
        pass: value <= goal,
    }
}

pub fn ratio(section: &Section, label: &str, clients: usize, ours: System, peer: System) -> f64 {
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
        "bussig `send`, an `INSERT` into the hand-written table, PgQ `insert_event`, pgmq `send`; each an \
         autocommit statement. The notify row sends to a bussig queue created with `notify => true`; the \
         granted row sends as a role that holds only `send` on the queue (`SET ROLE`). The \
         six runs of a row take turns: four slices of a quarter of the time each, in rotation.",
    );
    for &clients in &cfg.clients {
        for system in SYSTEMS {
            reset(admin, system)?;
        }
        ensure_bussig_queue(admin, "bench_notify", true)?;
        granted_sender(admin)?;
        let mut setups: Vec<Setup> = SYSTEMS
            .iter()
            .map(|&system| -> Setup {
                Box::new(move |c, _| Ok(Sender::new(c, system, QUEUE, false)?.step()))
            })
            .collect();
        setups.push(Box::new(|c, _| {
            Ok(Sender::new(c, System::Bussig, "bench_notify", false)?.step())
        }));
        setups.push(Box::new(|c, _| {
            c.batch_execute(&format!("SET ROLE {GRANTED_SENDER}"))?;
            Ok(Sender::new(c, System::Bussig, QUEUE, false)?.step())
        }));
        let outcomes = in_turns(&cfg.url, clients, cfg.run, &setups)?;
        section.add("send", Some(clients), rate_cells(&outcomes));
        section.add(
            "send, notify => true",
            Some(clients),
            only(System::Bussig, rate_cell(&outcomes[SYSTEMS.len()])),
        );
        section.add(
            GRANTED_SEND,
            Some(clients),
            only(System::Bussig, rate_cell(&outcomes[SYSTEMS.len() + 1])),
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
        // Applications send as roles granted `send`, not as superusers; their check is one kept
        // statement per send (a superuser's send runs none).
        let granted = section
            .value(GRANTED_SEND, Some(clients), System::Bussig)
            .unwrap_or(f64::NAN);
        targets.push(at_least(
            format!("send as a role granted send vs as a superuser, {clients} client(s)"),
            granted / plain,
            0.8,
        ));
    }
    Ok(section)
}

const GRANTED_SEND: &str = "send as a role granted send";
const GRANTED_SENDER: &str = "bench_sender";

/// A role that may only send to QUEUE (made again after each reset of the queue).
fn granted_sender(admin: &mut Client) -> Res<()> {
    admin.batch_execute(&format!(
        "DO $$ BEGIN CREATE ROLE {GRANTED_SENDER}; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    ))?;
    admin.execute(
        "SELECT bussig.grant($1, $2, ARRAY['send'])",
        &[&QUEUE, &GRANTED_SENDER],
    )?;
    Ok(())
}

/// Workload 2: batches of 100 messages in one statement.
pub fn send_batches(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let mut section = Section::new(
        "2. Send a batch of 100 in one transaction",
        "msgs/s",
        "bussig `send_batch` of 100, the hand-written multi-row `INSERT ... SELECT unnest($1::jsonb[])`, \
         PgQ `insert_event` over `unnest` of 100 in one statement, pgmq `send_batch` of 100. The systems \
         take turns: four slices of a quarter of the time each, in rotation.",
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
             `DELETE ... WHERE id = ANY($1)`; pgmq `read(queue, 30, 10)` then `delete(queue, msg_ids)`; all three \
             two autocommit transactions per batch. PgQ: `next_batch`, \
             `get_batch_events`, `finish_batch` in one transaction, with a tick every 500 events (pgqd's \
             default); a PgQ batch has one reader, so it runs with 1 client only. The second row is bussig's \
             one-call loop against the peers' two-transaction consume (the same peer figures as the first row).",
            format_value(cfg.consume_fill as f64)
        ),
    );
    for &clients in &cfg.clients {
        let mut two = no_cells();
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
            ack_and_read_step(c, QUEUE, 10)
        })?;
        let mut one = peer_copies(&two);
        one[index_of(System::Bussig)] = Some(rate_cell(&outcome));
        section.add(TWO_TRANSACTIONS, Some(clients), two);
        section.add(ONE_CALL, Some(clients), one);
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

/// The two-transaction peers' cells of a row again, for the row of bussig's one-call loop (not PgQ's,
/// whose consume is of another kind).
pub fn peer_copies(cells: &Cells) -> Cells {
    let mut copies = no_cells();
    for system in [System::Hand, System::Pgmq] {
        let i = index_of(system);
        copies[i] = cells[i].as_ref().map(|c| Cell {
            value: c.value,
            detail: c.detail.clone(),
        });
    }
    copies
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
        let mut cells = no_cells();
        for system in WITHOUT_PGMQ {
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

/// Vacuums everything between workloads so autovacuum debt from one does not land on the next.
pub fn settle(admin: &mut Client) -> Res<()> {
    for system in SYSTEMS {
        vacuum(admin, system)?;
    }
    Ok(())
}
