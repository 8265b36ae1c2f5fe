//! Workloads 10 and 11, shapes met in the field rather than in a lab: a queue consumed right after it
//! was filled, before any ANALYZE has seen it, and a job queue worked by many slow consumers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::types::ToSql;
use postgres::Client;

use crate::load::closed_loop;
use crate::pg::{connect, millis, Res, Samples};
use crate::report::{format_value, no_cells, Cell, Section, Target};
use crate::systems::{ack_and_read_step, fill, prefill, reset, vacuum, Consumer, System, QUEUE};
use crate::workloads::{at_least, index_of, peer_copies, rate_cell, ratio};
use crate::Config;

const FRESH_CLIENTS: usize = 2;
/// Messages of another bussig queue in the table when it is analyzed, as in a bus already in use.
const OTHER_MESSAGES: i64 = 10_000;
const TWO_TRANSACTIONS: &str = "new queue, read 10, ack them in a 2nd transaction";
const ONE_CALL: &str = "new queue, bussig ack_and_read(10); peers: 2-transaction consume";

/// The tables a system keeps `queue`'s messages in.
fn tables(admin: &mut Client, system: System, queue: &str) -> Res<Vec<String>> {
    Ok(match system {
        System::Bussig => vec!["bussig.message".into(), "bussig.body".into()],
        System::Hand => vec!["hand.queue".into()],
        System::Pgmq => crate::pgmq::tables(admin, queue)?,
        System::Pgq => unreachable!("PgQ takes no part in workload 10"),
    })
}

fn analyzes(admin: &mut Client, tables: &[String]) -> Res<i64> {
    let row = admin.query_one(
        "SELECT coalesce(sum(analyze_count + autoanalyze_count), 0)::bigint
           FROM pg_stat_user_tables WHERE relid = ANY($1::text[]::regclass[])",
        &[&tables],
    )?;
    Ok(row.get(0))
}

fn set_autovacuum(admin: &mut Client, tables: &[String], on: bool) -> Res<()> {
    for table in tables {
        let change = if on {
            "RESET (autovacuum_enabled)"
        } else {
            "SET (autovacuum_enabled = off)"
        };
        admin.batch_execute(&format!("ALTER TABLE {table} {change}"))?;
    }
    Ok(())
}

/// One run of workload 10: the statistics are taken, autovacuum is kept off the tables, then a new
/// queue is created, filled and consumed by `FRESH_CLIENTS` clients.
fn fresh_run(cfg: &Config, admin: &mut Client, system: System, one_call: bool) -> Res<Cell> {
    let queue = if one_call { "fresh_one_call" } else { "fresh" };
    reset(admin, system)?;
    if system == System::Bussig {
        prefill(admin, system, OTHER_MESSAGES)?;
    }
    let shared = tables(admin, system, queue)?;
    set_autovacuum(admin, &shared, false)?;
    match system {
        System::Bussig => {
            admin.execute("SELECT bussig.create_queue($1)", &[&queue])?;
        }
        System::Pgmq => {
            crate::pgmq::recreate(admin, queue)?;
            let own = tables(admin, system, queue)?;
            set_autovacuum(admin, &own, false)?;
        }
        _ => {}
    }
    let watched = tables(admin, system, queue)?;
    let before = analyzes(admin, &watched)?;
    fill(admin, system, queue, cfg.fresh_fill)?;
    let outcome = closed_loop(&cfg.url, FRESH_CLIENTS, cfg.run, true, |c, _| {
        if one_call {
            ack_and_read_step(c, queue, 10)
        } else {
            Ok(Consumer::new(c, system, queue, 10, None)?.step())
        }
    })?;
    let analyzed = analyzes(admin, &watched)? != before;
    set_autovacuum(admin, &shared, true)?;
    match system {
        System::Bussig => {
            admin.execute("SELECT bussig.drop_queue($1)", &[&queue])?;
        }
        System::Pgmq => crate::pgmq::drop_queue(admin, queue)?,
        _ => {}
    }
    let mut cell = rate_cell(&outcome);
    if analyzed {
        // The measurement no longer shows a queue unknown to the statistics.
        let separator = if cell.detail.is_empty() { "" } else { "; " };
        cell.detail = format!("{}{separator}ANALYZE ran during the run", cell.detail);
    }
    Ok(cell)
}

/// Workload 10: a queue created after the last ANALYZE, filled and consumed at once.
pub fn fresh_queue(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let mut section = Section::new(
        "10. Consume right after a fill, no ANALYZE since",
        "msgs/s",
        &format!(
            "The tables are analyzed (bussig's holding {} messages of another queue, as in a bus in use), \
             autovacuum is turned off on them (`autovacuum_enabled = off`, restored after), then a new queue \
             is created and filled with {} messages (bussig and pgmq `send_batch` in calls of 10,000; the \
             hand-written queue one `INSERT`), and {FRESH_CLIENTS} clients consume it at once, the planner \
             knowing nothing of it: bussig `read(queue, 10)` then `ack_batch`, the hand-written \
             `UPDATE ... SKIP LOCKED` then `DELETE`, pgmq `read` then `delete`, each two autocommit \
             transactions per batch; the second row is bussig's `ack_and_read` loop. A cell says so if an \
             ANALYZE of the tables ran all the same. PgQ's batches have no such plan to go wrong.",
            format_value(OTHER_MESSAGES as f64),
            format_value(cfg.fresh_fill as f64)
        ),
    );
    let mut two = no_cells();
    for system in [System::Bussig, System::Hand, System::Pgmq] {
        two[index_of(system)] = Some(fresh_run(cfg, admin, system, false)?);
    }
    let mut one = peer_copies(&two);
    one[index_of(System::Bussig)] = Some(fresh_run(cfg, admin, System::Bussig, true)?);
    section.add(TWO_TRANSACTIONS, Some(FRESH_CLIENTS), two);
    section.add(ONE_CALL, Some(FRESH_CLIENTS), one);
    for peer in [System::Hand, System::Pgmq] {
        targets.push(at_least(
            format!(
                "consume of a queue newer than the last ANALYZE vs {}, {FRESH_CLIENTS} clients",
                peer.name()
            ),
            ratio(
                &section,
                TWO_TRANSACTIONS,
                FRESH_CLIENTS,
                System::Bussig,
                peer,
            ),
            1.0,
        ));
    }
    Ok(section)
}

/// Simulated work per message of workload 11.
const WORK_PER_MESSAGE: Duration = Duration::from_millis(1);
/// The hand-written consumer's sleep when it finds nothing, and pgmq's poll interval.
pub const POLL: Duration = Duration::from_millis(10);

/// How many messages are waiting or being worked on: what a producer keeping a queue fed would look at.
pub fn depth_query(system: System) -> &'static str {
    match system {
        System::Bussig => "SELECT bussig.queue_depth($1)",
        System::Hand => "SELECT count(*) FROM hand.queue",
        System::Pgmq => "SELECT queue_length FROM pgmq.metrics($1)",
        System::Pgq => unreachable!("PgQ takes no part in workload 11"),
    }
}

/// What the producer saw: the depths, how long each look took from the client (round trip), and how
/// long the server spent on it (from the statement's start to the depth computed). With a hundred
/// busy consumers on 2 cores the round trip is mostly waiting for a CPU, which any statement meets.
struct Looks {
    depths: Vec<i64>,
    round_trips: Samples,
    in_server: Samples,
}

/// The depth query with the server's time on it, in milliseconds: the subquery is computed first.
fn timed_depth_query(system: System) -> String {
    format!(
        "SELECT depth, (extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::float8
         FROM ({} OFFSET 0) AS look(depth)",
        depth_query(system)
    )
}

/// Keeps the queue about `depth` deep until `running` is cleared; returns what it saw.
fn producer(cfg: &Config, system: System, running: &AtomicBool) -> Res<Looks> {
    let mut client = connect(&cfg.url)?;
    let depth_of = client.prepare(&timed_depth_query(system))?;
    let queue: &[&(dyn ToSql + Sync)] = match system {
        System::Hand => &[],
        _ => &[&QUEUE],
    };
    let mut seen = Vec::new();
    let mut looks = Vec::new();
    let mut in_server = Vec::new();
    while running.load(Ordering::Relaxed) {
        let started = Instant::now();
        let row = client.query_one(&depth_of, queue)?;
        looks.push(millis(started.elapsed()));
        let (depth, server_ms): (i64, f64) = (row.get(0), row.get(1));
        in_server.push(server_ms);
        seen.push(depth);
        let missing = cfg.job_depth - depth;
        if missing > 0 {
            fill(&mut client, system, QUEUE, missing.min(1_000))?;
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(Looks {
        depths: seen,
        round_trips: Samples::new(looks),
        in_server: Samples::new(in_server),
    })
}

/// Workload 11: N consumers each long-polling for 10 jobs, working 1 ms on each, then acking them,
/// while a producer keeps the queue `job_depth` deep.
pub fn job_queue(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let mut section = Section::new(
        "11. Depth-polling job queue, consumers swept",
        "jobs/s",
        &format!(
            "N consumers, one connection each, loop: take up to 10 jobs (bussig `read(queue, 10, wait => \
             '1 second')`; pgmq `read_with_poll(queue, 30, 10, 1, 10)`; the hand-written `UPDATE ... SKIP \
             LOCKED`, sleeping {} ms when it finds none), work {} ms on each (a client-side sleep), then \
             ack them in a second transaction (`ack_batch`, `delete`, `DELETE`). One producer keeps the \
             queue about {} deep: it reads the depth (bussig `queue_depth(queue)`, pgmq \
             `metrics(queue).queue_length`, the hand-written `count(*)`) and tops it up in one batch of at \
             most 1,000, or sleeps 5 ms. In brackets: the median depth the producer saw, the p99 of the \
             time one look at the depth took in the server (from its statement's start to the depth \
             computed) and of its round trip from the producer (which, with a hundred busy consumers on 2 \
             cores, is mostly the wait for a CPU that any statement meets), and at the largest N the rate \
             as a share of the sweep's best.",
            POLL.as_millis(),
            WORK_PER_MESSAGE.as_millis(),
            format_value(cfg.job_depth as f64)
        ),
    );
    let systems = [System::Bussig, System::Hand, System::Pgmq];
    let mut rates = vec![Vec::new(); systems.len()];
    let mut slowest_look = vec![0.0_f64; systems.len()];
    for &consumers in &cfg.job_consumers {
        let mut cells = no_cells();
        for (s, &system) in systems.iter().enumerate() {
            reset(admin, system)?;
            fill(admin, system, QUEUE, cfg.job_depth)?;
            vacuum(admin, system)?;
            let (outcome, mut looks) = sweep_cell(cfg, system, consumers)?;
            looks.depths.sort_unstable();
            let median = looks
                .depths
                .get(looks.depths.len() / 2)
                .copied()
                .unwrap_or(0);
            rates[s].push(outcome.rate());
            let in_server_p99 = looks.in_server.percentile(99.0);
            slowest_look[s] = slowest_look[s].max(in_server_p99);
            cells[index_of(system)] = Some(Cell {
                value: outcome.rate(),
                detail: format!(
                    "depth {}, look p99 {in_server_p99:.2} ms in the server, {:.2} ms round trip",
                    format_value(median as f64),
                    looks.round_trips.percentile(99.0)
                ),
            });
        }
        section.add("read 10, work 1 ms each, ack", Some(consumers), cells);
    }
    // The rate at the largest N as a share of the best of the sweep.
    let last = section.lines.len() - 1;
    let largest = cfg.job_consumers.last().copied().unwrap_or(0);
    for (s, &system) in systems.iter().enumerate() {
        let best = rates[s].iter().copied().fold(f64::NAN, f64::max);
        let share = rates[s].last().copied().unwrap_or(f64::NAN) / best;
        if let Some(cell) = section.lines[last].cells[index_of(system)].as_mut() {
            cell.detail = format!("{}; {share:.2}x of the best", cell.detail);
        }
        if system == System::Bussig {
            targets.push(at_least(
                format!("job queue: {largest} consumers vs the best of the sweep"),
                share,
                0.8,
            ));
            let at = |n: usize| {
                let i = cfg.job_consumers.iter().position(|&c| c == n)?;
                rates[s].get(i).copied()
            };
            // The bound for a producer's poll: about a millisecond, whatever the churn. The
            // look's own time: its round trip at 128 consumers on 2 cores is mostly the wait for a CPU.
            targets.push(Target {
                name: "job queue: p99 of a look at the depth in the server, worst cell".into(),
                measured: format!("{:.2} ms", slowest_look[s]),
                goal: "<= 1 ms".into(),
                pass: slowest_look[s] <= 1.0,
            });
            if let (Some(sixteen), Some(sixty_four)) = (at(16), at(64)) {
                targets.push(at_least(
                    "job queue: 64 consumers vs 16".to_string(),
                    sixty_four / sixteen,
                    1.0,
                ));
            }
        }
    }
    Ok(section)
}

fn sweep_cell(
    cfg: &Config,
    system: System,
    consumers: usize,
) -> Res<(crate::load::Outcome, Looks)> {
    let running = AtomicBool::new(true);
    std::thread::scope(|scope| {
        let feeding = scope.spawn(|| producer(cfg, system, &running));
        let outcome = closed_loop(&cfg.url, consumers, cfg.run, false, |c, _| {
            let wait = (system != System::Hand).then_some(1_000);
            let consumer = Consumer::new(c, system, QUEUE, 10, wait)?;
            Ok(Box::new(move |c: &mut Client| {
                let locked = consumer.read(c)?;
                if locked.len() == 0 {
                    if system == System::Hand {
                        std::thread::sleep(POLL);
                    }
                    return Ok(0);
                }
                std::thread::sleep(WORK_PER_MESSAGE * locked.len() as u32);
                Ok(consumer.settle(c, locked)?.len() as u64)
            }))
        });
        running.store(false, Ordering::Relaxed);
        let looks = feeding.join().expect("producer panicked")?;
        Ok((outcome?, looks))
    })
}
