//! Workload 15: the Python client's `Worker` (clients/python) with a handler that does nothing,
//! draining a pre-filled queue, against procrastinate's and pgqueuer's own workers installed from PyPI
//! into the same virtual environment, at the same concurrency and on the same database.
//! `bench/python_drain.sh` installs them and runs `clients/python/bench/drain.py`, which prints a JSON
//! line per measurement; this module turns them into the section's table and targets.
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use postgres::Client;

use crate::pg::Res;
use crate::report::{format_value, Section, Target};
use crate::workloads::at_least;
use crate::Config;

const CONCURRENCY: [usize; 3] = [1, 4, 16];
/// drain.py's names, in the table's order: the client's two flavours, then the peers.
const ASYNC: &str = "bussig";
const THREADS: &str = "bussig-threads";
const PEERS: [&str; 2] = ["procrastinate", "pgqueuer"];
/// Each flavour of the worker against the faster peer, at every concurrency.
const GOAL: f64 = 1.5;
/// The peers drain a few hundred messages a second at low concurrency: each measurement stops at
/// this time at the latest, so that the workload takes a couple of minutes.
const LONGEST: Duration = Duration::from_secs(10);

pub fn python_worker(cfg: &Config, _admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let messages: u64 = if cfg.quick { 2_000 } else { 20_000 };
    let seconds = cfg.run.min(LONGEST).as_secs_f64();
    let concurrency = CONCURRENCY.map(|c| c.to_string()).join(",");
    let output = Command::new("bench/python_drain.sh")
        .args(["--conninfo", &cfg.url, "--messages", &messages.to_string()])
        .args([
            "--seconds",
            &seconds.to_string(),
            "--concurrency",
            &concurrency,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()?;
    if !output.status.success() {
        return Err(format!("bench/python_drain.sh failed: {}", output.status).into());
    }
    let mut rates: BTreeMap<(String, usize), f64> = BTreeMap::new();
    let mut versions = String::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(found) = value.get("versions").and_then(|v| v.as_object()) {
            versions = found
                .iter()
                .map(|(name, version)| format!("{name} {}", version.as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ");
        } else if let (Some(system), Some(clients), Some(rate)) = (
            value["system"].as_str(),
            value["concurrency"].as_u64(),
            value["msgs_per_s"].as_f64(),
        ) {
            rates.insert((system.to_string(), clients as usize), rate);
        }
    }

    let mut section = Section::new(
        "15. The Python client's worker against Python job queues",
        "msgs/s",
        &format!(
            "A queue pre-filled with {} messages (jobs) drained by one worker process at the given \
             concurrency (handlers in flight), with a handler that returns at once, until all are handled \
             or {seconds:.0} s have passed. `bussig.Worker` on asyncio (`await worker.run()`) and on threads \
             (`start()`), reading batches of 10; procrastinate's worker (`concurrency`) and pgqueuer's \
             (`max_concurrent_tasks`, with a batch of half of it as it requires, and 2 at concurrency 1). \
             Ratios: bussig's flavour over the faster of the two. Versions: {versions}.",
            format_value(messages as f64)
        ),
    );
    let mut header = vec!["workload".to_string(), "concurrency".to_string()];
    header.extend(
        ["bussig asyncio", "bussig threads", PEERS[0], PEERS[1]]
            .map(|name| format!("{name} msgs/s")),
    );
    header.extend(["asyncio/faster peer", "threads/faster peer"].map(String::from));
    let mut rows = Vec::new();
    for clients in CONCURRENCY {
        let rate = |system: &str| rates.get(&(system.to_string(), clients)).copied();
        let faster_peer = PEERS.iter().filter_map(|peer| rate(peer)).reduce(f64::max);
        let ratio = |ours: Option<f64>| match (ours, faster_peer) {
            (Some(ours), Some(peer)) if peer > 0.0 => ours / peer,
            _ => f64::NAN,
        };
        let mut row = vec!["drain, no-op handler".to_string(), clients.to_string()];
        row.extend(
            [ASYNC, THREADS, PEERS[0], PEERS[1]]
                .map(|system| rate(system).map_or("-".into(), format_value)),
        );
        for (flavour, system) in [("asyncio", ASYNC), ("threads", THREADS)] {
            let value = ratio(rate(system));
            row.push(format!("{value:.2}"));
            targets.push(at_least(
                format!("Python Worker ({flavour}) vs faster of procrastinate and pgqueuer, concurrency {clients}"),
                value,
                GOAL,
            ));
        }
        rows.push(row);
    }
    section.table = Some((header, rows));
    Ok(section)
}
