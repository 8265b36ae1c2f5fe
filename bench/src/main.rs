//! `make bench`: bussig against PgQ, pgmq and a hand-written SKIP LOCKED queue, in one cluster and one
//! run. `bench/run.sh` starts the cluster and installs bussig, PgQ and the hand-written queue; this
//! program installs pgmq's SQL, drives every workload, prints the tables and writes
//! `docs/benchmarks.md` with the soak chart next to it.

mod client;
mod faults;
mod features;
mod field;
mod groups;
mod ledger;
mod load;
mod pg;
mod pgmq;
mod pressure;
mod python;
mod report;
mod soak;
mod stream_soak;
mod streams;
mod systems;
mod workloads;

use std::time::{Duration, Instant};

use pg::Res;
use report::{Machine, Section, Target};

pub struct Config {
    pub url: String,
    pub quick: bool,
    /// Length of every closed-loop measurement.
    pub run: Duration,
    pub clients: Vec<usize>,
    /// Client counts for the bussig-only and latency workloads (5 and 6), a subset in a quick run.
    pub subset_clients: Vec<usize>,
    pub consume_fill: i64,
    /// Locked or delayed messages ahead of the ready ones (workload 5), and the ready ones behind them.
    pub backlog: i64,
    pub ready: i64,
    pub e2e_rate_per_producer: f64,
    pub wake_samples: usize,
    pub soak: Duration,
    pub hold: Duration,
    pub soak_interval: Duration,
    pub soak_rate: f64,
    /// Messages sent to a queue created after the last ANALYZE (workload 10).
    pub fresh_fill: i64,
    /// Consumer counts of the job-queue sweep (workload 11) and the depth its producer keeps.
    pub job_consumers: Vec<usize>,
    pub job_depth: i64,
    /// The unpressured baseline of workload 12, and the length of each of its two pressures.
    pub pressure_baseline: Duration,
    pub pressure_seconds: Duration,
    /// The pgmq version its installer reported.
    pub pgmq_version: String,
}

impl Config {
    fn new(url: String, quick: bool) -> Self {
        let seconds = Duration::from_secs_f64;
        if quick {
            Config {
                url,
                quick,
                run: seconds(1.0),
                clients: vec![1, 2, 4],
                subset_clients: vec![1],
                consume_fill: 50_000,
                backlog: 50_000,
                ready: 10_000,
                e2e_rate_per_producer: 200.0,
                wake_samples: 100,
                soak: seconds(45.0),
                hold: seconds(9.0),
                soak_interval: seconds(5.0),
                soak_rate: 1_000.0,
                fresh_fill: 200_000,
                job_consumers: vec![4, 16, 64, 128],
                job_depth: 4_000,
                pressure_baseline: seconds(6.0),
                pressure_seconds: seconds(10.0),
                pgmq_version: String::new(),
            }
        } else {
            Config {
                url,
                quick,
                run: seconds(20.0),
                clients: vec![1, 2, 4],
                subset_clients: vec![1, 2, 4],
                consume_fill: 500_000,
                backlog: 50_000,
                ready: 10_000,
                e2e_rate_per_producer: 200.0,
                wake_samples: 1_000,
                soak: seconds(600.0),
                hold: seconds(120.0),
                soak_interval: seconds(10.0),
                soak_rate: 1_000.0,
                fresh_fill: 200_000,
                job_consumers: vec![4, 16, 64, 128],
                job_depth: 4_000,
                pressure_baseline: seconds(60.0),
                pressure_seconds: seconds(240.0),
                pgmq_version: String::new(),
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let outcome = match args.get(1).map(String::as_str) {
        // Workload 13 runs its consumers as processes of their own, to kill one.
        Some(ledger::CONSUMER_COMMAND) => {
            ledger::consumer_process(args.get(2).map_or("", String::as_str))
        }
        _ => run(),
    };
    if let Err(error) = outcome {
        // postgres::Error says only "db error"; the server's message is in its source.
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message = format!("{message}: {cause}");
            source = cause.source();
        }
        eprintln!("bench: {message}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let started = Instant::now();
    let quick = std::env::args().any(|a| a == "--quick");
    let url =
        std::env::var("BENCH_URL").map_err(|_| "BENCH_URL is not set (bench/run.sh sets it)")?;
    let docs = std::env::var("BENCH_DOCS").unwrap_or_else(|_| "docs".into());
    let mut cfg = Config::new(url, quick);
    cfg.pgmq_version = pgmq::install(&cfg.url)?;
    // While developing: BENCH_ONLY=1,3 runs those workloads (8 is the soak), BENCH_SECONDS sets the
    // length of each measurement. A partial run prints its tables and writes nothing to docs/.
    let only: Option<Vec<String>> = std::env::var("BENCH_ONLY")
        .ok()
        .map(|list| list.split(',').map(|w| w.trim().to_string()).collect());
    // BENCH_SKIP=12,13: a full run without those workloads, written to docs/ under that command.
    let skip: Vec<String> = std::env::var("BENCH_SKIP")
        .map(|list| list.split(',').map(|w| w.trim().to_string()).collect())
        .unwrap_or_default();
    let wanted = |number: &str| {
        !skip.iter().any(|w| w == number)
            && only
                .as_ref()
                .is_none_or(|list| list.iter().any(|w| w == number))
    };
    let seconds_from = |name: &str, into: &mut Duration| -> Res<()> {
        if let Ok(seconds) = std::env::var(name) {
            *into = Duration::from_secs_f64(
                seconds
                    .parse()
                    .map_err(|_| format!("{name} is not a number"))?,
            );
        }
        Ok(())
    };
    seconds_from("BENCH_SECONDS", &mut cfg.run)?;
    seconds_from("BENCH_PRESSURE_BASELINE", &mut cfg.pressure_baseline)?;
    seconds_from("BENCH_PRESSURE_SECONDS", &mut cfg.pressure_seconds)?;
    // BENCH_JOB_CONSUMERS=128: only those consumer counts in workload 11's sweep.
    if let Ok(counts) = std::env::var("BENCH_JOB_CONSUMERS") {
        cfg.job_consumers = counts
            .split(',')
            .map(|count| count.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|_| "BENCH_JOB_CONSUMERS is not a list of numbers")?;
    }
    let mut admin = pg::connect(&cfg.url)?;
    println!(
        "{} run: {:.1} s per measurement, clients {:?}",
        if quick { "QUICK" } else { "full" },
        cfg.run.as_secs_f64(),
        cfg.clients
    );

    let mut sections: Vec<Section> = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    let show = |section: Section, sections: &mut Vec<Section>| {
        report::print_section(&section);
        sections.push(section);
    };
    type Workload = fn(&Config, &mut postgres::Client, &mut Vec<Target>) -> Res<Section>;
    let workloads: [(&str, Workload); 15] = [
        ("1 send", workloads::sends),
        ("2 send_batch", workloads::send_batches),
        ("3 consume", workloads::consume),
        ("5 head of line", features::head_of_line),
        ("6 routing", features::routing),
        ("7 long-poll wake", features::wake),
        (
            "10 consume after a fill with no ANALYZE",
            field::fresh_queue,
        ),
        ("11 depth-polling job queue sweep", field::job_queue),
        ("12 pressure on the vacuum horizon", pressure::pressure),
        ("13 faults, with a ledger", faults::faults),
        ("14 the Rust client's consumer", client::client_consumer),
        ("15 the Python client's worker", python::python_worker),
        ("16 ordered message groups", groups::groups),
        ("17 streams", streams::streams),
        ("18 streams' soak", stream_soak::stream_soak),
    ];
    for (name, workload) in workloads {
        let number = name.split(' ').next().unwrap_or(name);
        if !wanted(number) {
            if number == "3" && wanted("4") {
                workloads::settle(&mut admin)?;
                show(workloads::end_to_end(&cfg, &mut admin)?, &mut sections);
            }
            continue;
        }
        eprintln!(
            "[{:>5.0} s] workload {name}",
            started.elapsed().as_secs_f64()
        );
        workloads::settle(&mut admin)?;
        let section = workload(&cfg, &mut admin, &mut targets)?;
        show(section, &mut sections);
        if number == "3" && wanted("4") {
            eprintln!(
                "[{:>5.0} s] workload 4 producers and consumers",
                started.elapsed().as_secs_f64()
            );
            workloads::settle(&mut admin)?;
            show(workloads::end_to_end(&cfg, &mut admin)?, &mut sections);
        }
    }
    if only.is_some() {
        if wanted("8") {
            workloads::settle(&mut admin)?;
            for section in soak::soak(&cfg, &mut admin, &mut targets)?.0 {
                report::print_section(&section);
            }
        }
        report::print_targets(&targets);
        return Ok(());
    }
    eprintln!(
        "[{:>5.0} s] workload 8 soak ({:.0} s) and 9 memory",
        started.elapsed().as_secs_f64(),
        cfg.soak.as_secs_f64()
    );
    workloads::settle(&mut admin)?;
    let (soak_sections, chart) = soak::soak(&cfg, &mut admin, &mut targets)?;
    for section in soak_sections {
        show(section, &mut sections);
    }
    // The report follows the workloads' numbers (4 after 3, the soak's 8b after 8), not the order they ran in.
    let order = |s: &Section| {
        let digits: String = s.title.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().unwrap_or(99)
    };
    sections.sort_by_key(order);
    report::print_targets(&targets);

    let elapsed = started.elapsed().as_secs_f64();
    let mut machine = describe_machine(&mut admin, quick, elapsed, &cfg.pgmq_version)?;
    if !skip.is_empty() {
        machine.command = format!("BENCH_SKIP={} {}", skip.join(","), machine.command);
    }
    let chart_file = "benchmarks-soak.svg";
    std::fs::write(format!("{docs}/{chart_file}"), report::soak_svg(&chart))?;
    std::fs::write(
        format!("{docs}/benchmarks.md"),
        report::markdown(&machine, &sections, &targets, chart_file),
    )?;
    println!("\nwrote {docs}/benchmarks.md and {docs}/{chart_file} ({elapsed:.0} s in all)");
    Ok(())
}

fn describe_machine(
    admin: &mut postgres::Client,
    quick: bool,
    elapsed: f64,
    pgmq_version: &str,
) -> Res<Machine> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kb: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".into(), |m| m.trim().to_string());
    let cores = std::thread::available_parallelism().map_or("?".into(), |n| n.to_string());
    let postgres: String = admin.query_one("SELECT version()", &[])?.get(0);
    let date: String = admin
        .query_one(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"')",
            &[],
        )?
        .get(0);
    let versions: Vec<String> = admin
        .query("SELECT extname || ' ' || extversion FROM pg_extension WHERE extname IN ('bussig', 'pgq') ORDER BY 1", &[])?
        .iter()
        .map(|r| r.get(0))
        .chain([format!("pgmq {pgmq_version} (its SQL, without the extension)")])
        .collect();
    Ok(Machine {
        cores,
        memory: format!("{:.1} GiB", memory_kb / 1024.0 / 1024.0),
        cpu,
        postgres: format!("{postgres}; extensions: {}", versions.join(", ")),
        settings: std::env::var("BENCH_SETTINGS").unwrap_or_default(),
        date,
        command: if quick {
            "make bench QUICK=1".into()
        } else {
            "make bench".into()
        },
        elapsed: format!(
            "{:.0} minutes {:.0} seconds",
            (elapsed / 60.0).floor(),
            elapsed % 60.0
        ),
    })
}
