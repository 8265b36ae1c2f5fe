//! Workload 8, the soak: every system under the same steady produce/consume rate at once, with one
//! transaction held open in the middle (it holds back vacuum for all of them alike); and workload 9,
//! the peak memory of the backends that ran it and of bussig's worker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::Client;

use crate::pg::{connect, millis, sleep_until, Res};
use crate::report::{format_value, no_cells, only, Cell, Section, Soak, Target};
use crate::systems::{
    batch_sender, pgq_ticker, pgq_ticker_settings, reset, storage_size, Consumer, System, QUEUE,
    WITHOUT_PGMQ,
};
use crate::Config;

const BATCH: usize = 10;

/// What one system's consumer saw, per interval, and the peak memory of its two backends.
struct Lane {
    consumed: Vec<u64>,
    read_ms: Vec<f64>,
    consumer_peak: Memory,
    producer_peak: Memory,
}

/// A process's peak resident set (`VmHWM`, shared buffers it touched included) and its private
/// memory now (`RssAnon`), in kB.
#[derive(Clone, Copy, Default)]
struct Memory {
    peak_kb: u64,
    private_kb: u64,
}

fn memory_of(pid: i32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        peak_kb: field("VmHWM:"),
        private_kb: field("RssAnon:"),
    }
}

fn memory_cell(memory: Memory) -> Cell {
    Cell {
        value: memory.peak_kb as f64 / 1024.0,
        detail: format!(
            "{:.1} MB private at the end",
            memory.private_kb as f64 / 1024.0
        ),
    }
}

/// A soak's timeline, in seconds from its start: its length, the intervals it counts in, when the
/// held transaction begins and ends, and the intervals its first and last windows take.
pub struct SoakPlan {
    pub duration: f64,
    pub interval: f64,
    pub intervals: usize,
    pub hold_start: f64,
    pub hold_end: f64,
    pub window: usize,
}

impl SoakPlan {
    pub fn of(cfg: &Config) -> SoakPlan {
        let duration = cfg.soak.as_secs_f64();
        let interval = cfg.soak_interval.as_secs_f64();
        let hold_start = (duration - cfg.hold.as_secs_f64()) / 2.0;
        SoakPlan {
            duration,
            interval,
            intervals: (duration / interval).ceil() as usize,
            hold_start,
            hold_end: hold_start + cfg.hold.as_secs_f64(),
            window: (duration / 10.0 / interval).ceil().max(1.0) as usize,
        }
    }
}

/// The throughput of the last `window` intervals against the first's: flat within 10%.
pub fn drift_target(
    what: &str,
    consumed: &[u64],
    window: usize,
    interval: f64,
    note: &str,
) -> Target {
    let first: u64 = consumed[..window].iter().sum();
    let last: u64 = consumed[consumed.len() - window..].iter().sum();
    let drift = last as f64 / first.max(1) as f64;
    let seconds = window as f64 * interval;
    Target {
        name: format!("{what}: last {seconds:.0} s vs first {seconds:.0} s throughput"),
        measured: format!("{drift:.2}x{note}"),
        goal: "0.90x - 1.10x".into(),
        pass: (0.9..=1.1).contains(&drift),
    }
}

/// Holds a REPEATABLE READ transaction with an assigned transaction id from `from` to `until`: what an
/// idle-in-transaction session holds back vacuum with.
pub fn hold_snapshot(url: &str, from: Instant, until: Instant) -> Res<()> {
    let mut client = connect(url)?;
    sleep_until(from);
    let mut transaction = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()?;
    transaction.query_one("SELECT txid_current()", &[])?;
    sleep_until(until);
    transaction.commit()?;
    Ok(())
}

fn backend_pid(client: &mut Client) -> Res<i32> {
    Ok(client.query_one("SELECT pg_backend_pid()", &[])?.get(0))
}

fn mb(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn soak(
    cfg: &Config,
    admin: &mut Client,
    targets: &mut Vec<Target>,
) -> Res<(Vec<Section>, Soak)> {
    for system in WITHOUT_PGMQ {
        reset(admin, system)?;
    }
    pgq_ticker_settings(admin, "10 milliseconds")?;
    // PgQ reclaims space by rotating its event tables, every 2 hours by default: make it rotate within
    // the soak, as a PgQ user with this churn would.
    let rotation = format!("{} seconds", (cfg.soak.as_secs() / 6).max(5));
    admin.execute(
        "SELECT pgq.set_queue_config($1, 'rotation_period', $2)",
        &[&QUEUE, &rotation],
    )?;

    let SoakPlan {
        duration,
        interval,
        intervals,
        hold_start,
        hold_end,
        window,
    } = SoakPlan::of(cfg);
    let running = AtomicBool::new(true);
    let ticking = AtomicBool::new(true);
    let start = Instant::now();
    let at = |seconds: f64| start + Duration::from_secs_f64(seconds);

    let (lanes, sizes, worker_memory) = std::thread::scope(|scope| -> Res<_> {
        let ticker = scope.spawn(|| pgq_ticker(&cfg.url, Duration::from_millis(10), 100, &ticking));
        let lanes: Vec<_> = WITHOUT_PGMQ
            .iter()
            .map(|&system| {
                let running = &running;
                let producer = scope.spawn(move || -> Res<Memory> {
                    let mut client = connect(&cfg.url)?;
                    let mut send = batch_sender(&mut client, system, BATCH)?;
                    let pause = Duration::from_secs_f64(BATCH as f64 / cfg.soak_rate);
                    let mut next = start;
                    while running.load(Ordering::Relaxed) {
                        sleep_until(next);
                        send(&mut client)?;
                        next += pause;
                    }
                    Ok(memory_of(backend_pid(&mut client)?))
                });
                let consumer = scope.spawn(move || -> Res<(Vec<u64>, Vec<f64>, Memory)> {
                    let mut client = connect(&cfg.url)?;
                    // No long poll here: every consumer polls alike, so their read times compare.
                    let consumer = Consumer::new(&mut client, system, QUEUE, BATCH as i32, None)?;
                    let (mut consumed, mut busy, mut reads) = (
                        vec![0u64; intervals],
                        vec![0.0; intervals],
                        vec![0u64; intervals],
                    );
                    while running.load(Ordering::Relaxed) {
                        let before = Instant::now();
                        let settled = consumer.consume(&mut client)?.len();
                        let slot = ((before - start).as_secs_f64() / interval) as usize;
                        if slot >= intervals {
                            break;
                        }
                        consumed[slot] += settled as u64;
                        if settled > 0 {
                            busy[slot] += millis(before.elapsed());
                            reads[slot] += 1;
                        } else {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    let read_ms = busy
                        .iter()
                        .zip(&reads)
                        .map(|(b, n)| if *n > 0 { b / *n as f64 } else { f64::NAN })
                        .collect();
                    Ok((consumed, read_ms, memory_of(backend_pid(&mut client)?)))
                });
                (system, producer, consumer)
            })
            .collect();

        let holder = scope.spawn(|| hold_snapshot(&cfg.url, at(hold_start), at(hold_end)));

        // Sizes at the end of the first window (the queue in its steady state), right after the held
        // transaction ends, and at the end.
        let mut sizes = Vec::new();
        for moment in [window as f64 * interval, hold_end + 1.0, duration - 0.5] {
            sleep_until(at(moment));
            let row: Vec<i64> = WITHOUT_PGMQ
                .iter()
                .map(|&s| storage_size(admin, s))
                .collect::<Res<_>>()?;
            sizes.push(row);
        }
        let worker_pid: Option<i32> = admin
            .query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type = 'bussig worker' AND datname = current_database()", &[])?
            .map(|row| row.get(0));
        sleep_until(at(duration));
        running.store(false, Ordering::Relaxed);
        let mut lanes_out = Vec::new();
        for (system, producer, consumer) in lanes {
            let producer_memory = producer.join().expect("producer panicked")?;
            let (consumed, read_ms, consumer_memory) =
                consumer.join().expect("consumer panicked")?;
            lanes_out.push((
                system,
                Lane {
                    consumed,
                    read_ms,
                    consumer_peak: consumer_memory,
                    producer_peak: producer_memory,
                },
            ));
        }
        let worker_memory = worker_pid.map(memory_of);
        holder.join().expect("holder panicked")?;
        ticking.store(false, Ordering::Relaxed);
        ticker.join().expect("ticker panicked")?;
        Ok((lanes_out, sizes, worker_memory))
    })?;

    let mut throughput = Section::new(
        "8. Soak",
        "msgs/s",
        &format!(
            "{} s with all three systems at once, each with one producer sending batches of {BATCH} at a \
             steady {} msgs/s and one consumer taking batches of {BATCH} as fast as it can, sleeping 1 ms when there is none \
             (bussig and the hand-written queue: read, then ack in a second transaction; PgQ: one batch per tick, ticker every \
             10 ms, tables rotated every {rotation}). A REPEATABLE READ transaction with a transaction id is \
             held open from {hold_start:.0} s to {hold_end:.0} s. Messages consumed per second in each \
             {interval:.0}-second interval; in brackets the mean time of one read-and-ack.",
            format_value(duration),
            format_value(cfg.soak_rate)
        ),
    );
    for slot in 0..intervals {
        let mut cells = no_cells();
        for (i, (_, lane)) in lanes.iter().enumerate() {
            cells[i] = Some(Cell {
                value: lane.consumed[slot] as f64 / interval,
                detail: format!("{} ms", format_value(lane.read_ms[slot])),
            });
        }
        let from = slot as f64 * interval;
        throughput.add(&format!("{from:.0}-{:.0} s", from + interval), None, cells);
    }

    let mut storage = Section::new(
        "8b. Soak: storage",
        "MB",
        "`pg_total_relation_size` of each system's message tables (bussig: `bussig.message` and `bussig.body`; \
         hand-written: its table; PgQ: the queue's event tables), indexes and TOAST included. The start is \
         taken at the end of the first window, once the queue is in its steady state.",
    );
    for (label, row) in ["start", "held transaction ended", "end"]
        .iter()
        .zip(&sizes)
    {
        let mut cells = no_cells();
        for (i, bytes) in row.iter().enumerate() {
            cells[i] = Some(Cell {
                value: mb(*bytes),
                detail: String::new(),
            });
        }
        storage.add(label, None, cells);
    }

    let mut memory = Section::new(
        "9. Peak memory",
        "MB",
        "`VmHWM` (peak resident set) from `/proc/<pid>/status` of the soak's backends and of bussig's worker. \
         It counts the shared buffers a process touched, so it mostly measures how much of the table each \
         one read; `RssAnon` at the end of the soak, in brackets, is the process's own memory.",
    );
    let per_lane = |pick: fn(&Lane) -> Memory| {
        let mut cells = no_cells();
        for (i, (_, lane)) in lanes.iter().enumerate() {
            cells[i] = Some(memory_cell(pick(lane)));
        }
        cells
    };
    memory.add("consumer backend", None, per_lane(|l| l.consumer_peak));
    memory.add("producer backend", None, per_lane(|l| l.producer_peak));
    if let Some(worker) = worker_memory {
        memory.add(
            "bussig worker",
            None,
            only(System::Bussig, memory_cell(worker)),
        );
    }

    let (_, bussig) = &lanes[0];
    targets.push(drift_target("soak", &bussig.consumed, window, interval, ""));
    let growth = sizes[2][0] as f64 / sizes[0][0] as f64;
    targets.push(Target {
        name: "soak: size at the end vs at the start".into(),
        measured: format!(
            "{growth:.2}x ({} MB -> {} MB)",
            format_value(mb(sizes[0][0])),
            format_value(mb(sizes[2][0]))
        ),
        goal: "< 2x".into(),
        pass: growth < 2.0,
    });

    let chart = Soak {
        interval_secs: interval,
        hold_start,
        hold_end,
        duration,
        rates: lanes
            .iter()
            .map(|(s, l)| {
                (
                    *s,
                    l.consumed.iter().map(|c| *c as f64 / interval).collect(),
                )
            })
            .collect(),
        read_ms: lanes.iter().map(|(s, l)| (*s, l.read_ms.clone())).collect(),
    };
    Ok((vec![throughput, storage, memory], chart))
}
