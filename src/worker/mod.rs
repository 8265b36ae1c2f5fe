//! The background worker. With `shared_preload_libraries = 'bussig'` a launcher starts with the
//! server, lists the databases and starts one worker in each (that has the extension, and that
//! `bussig.worker_databases` allows). Each worker runs the maintenance steps every
//! `bussig.maintenance_interval`, and at once when a commit hands it a fan-out; it sends the NOTIFYs
//! that commits ask for as they come. A step that fails is
//! logged and rolled back; the loop goes on.
pub mod compaction;
pub mod maintenance;
pub mod stats;
#[cfg(any(test, feature = "pg_test"))]
mod tests;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::{pg_sys, IntoDatum};

use crate::error::BusResult;
use crate::pg::background::{self, current_database, databases, reload_settings_if_asked};
use crate::pg::gucs;
use crate::pg::wakeup::{self, Errands};

const LAUNCHER_TYPE: &str = "bussig launcher";
const WORKER_TYPE: &str = "bussig worker";
/// How often the launcher looks for new databases, and retries one whose worker stopped.
const LAUNCHER_INTERVAL: Duration = Duration::from_secs(10);
/// A database whose worker exited (no extension there) is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// How soon a start that found every worker slot taken is retried.
const SLOT_RETRY: Duration = Duration::from_secs(1);

/// The pause after sending notifications: bounds their added latency, and the worker's share of the CPU.
const NOTIFY_PAUSE_MICROS: std::ffi::c_long = 2_000;
/// Session advisory lock key that keeps one worker per database.
const WORKER_LOCK_KEY: i64 = 0x6275_7373_6967; // "bussig"

/// Registers the launcher; only possible while the server preloads the library.
pub fn register() {
    if !background::preloading() {
        return;
    }
    BackgroundWorkerBuilder::new(LAUNCHER_TYPE)
        .set_type(LAUNCHER_TYPE)
        .set_library("bussig")
        .set_function("bussig_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// Whether a worker runs in this database now, to take fan-outs off publishers.
pub fn serves_this_database() -> bool {
    wakeup::worker_registered() && database_allowed(&current_database())
}

/// `bussig.worker_databases`: a comma-separated list, empty for all.
fn database_allowed(name: &str) -> bool {
    match gucs::WORKER_DATABASES.get() {
        Some(list) => {
            let list = list.to_string_lossy();
            list.trim().is_empty() || list.split(',').any(|allowed| allowed.trim() == name)
        }
        None => true,
    }
}

/// Called at CREATE EXTENSION: says once when no worker will run, and otherwise asks the launcher
/// to start this database's worker now rather than at its next round. What it found.
pub fn ensure() -> &'static str {
    if !wakeup::shared_memory() {
        pgrx::notice!(
            "bussig: the background worker is not running: add bussig to shared_preload_libraries and \
             restart the server, or schedule SELECT bussig.run_maintenance() (every second, e.g. with pg_cron)"
        );
        return "not loaded";
    }
    if !database_allowed(&current_database()) {
        return "not in bussig.worker_databases";
    }
    wakeup::wake_launcher_at_commit();
    "starting"
}

/// Runs one step in its own transaction; an error is logged and rolled back, never fatal. None, quietly,
/// when the extension is not there or is being dropped.
fn run_step<T>(
    name: &str,
    step: impl FnOnce() -> BusResult<T> + std::panic::UnwindSafe,
) -> Option<T> {
    match background::in_transaction(step)? {
        Ok(value) => Some(value),
        Err(message) => {
            pgrx::warning!("bussig worker: {name} failed and was rolled back: {message}");
            None
        }
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn bussig_launcher_main(_argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    wakeup::register_worker();
    let mut attempts: HashMap<pg_sys::Oid, Attempt> = HashMap::new();
    // A wake-up (CREATE EXTENSION somewhere) retries every database at once.
    let mut woken = true;
    loop {
        reload_settings_if_asked();
        let mut due: Vec<(pg_sys::Oid, String)> = databases()
            .into_iter()
            .filter(|(database, name)| {
                database_allowed(name)
                    && attempts
                        .get(database)
                        .is_none_or(|attempt| attempt.due(woken))
            })
            .collect();
        // Databases never tried and those that found no free slot first, then those whose worker
        // left longest ago: with fewer worker slots than databases every database gets its turn,
        // instead of the first few in the catalog taking the slots on every round.
        due.sort_by_key(|(database, _)| attempts.get(database).map(Attempt::rank));
        let mut out_of_slots = false;
        for (database, name) in due {
            // Once no slot is free, the rest wait for one too, first in line next time.
            let worker = if out_of_slots {
                None
            } else {
                start_database_worker(database, &name)
            };
            if worker.is_none() && !out_of_slots {
                out_of_slots = true;
                pgrx::log!(
                    "bussig launcher: no worker slot free for database {name} yet; retrying"
                );
            }
            let at = Instant::now();
            attempts.insert(database, Attempt { worker, at });
        }
        let pause = if out_of_slots {
            SLOT_RETRY
        } else {
            LAUNCHER_INTERVAL
        };
        let slept = Instant::now();
        if !BackgroundWorker::wait_latch(Some(pause)) {
            break;
        }
        woken = slept.elapsed() < pause;
    }
}

/// The launcher's last start of a database's worker.
struct Attempt {
    /// None when no slot was free.
    worker: Option<DynamicBackgroundWorker>,
    at: Instant,
}

impl Attempt {
    fn alive(&self) -> bool {
        self.worker.as_ref().is_some_and(|worker| {
            matches!(
                worker.pid(),
                Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)
            )
        })
    }

    /// Whether to start this database's worker now: its worker is gone and, unless a wake-up asks
    /// for every database, it had no slot (retried at once) or left a while ago (no extension there).
    fn due(&self, woken: bool) -> bool {
        !self.alive() && (woken || self.worker.is_none() || self.at.elapsed() >= RETRY_AFTER)
    }

    /// Order among due databases (after those never tried): no slot last time first, then the
    /// longest ago.
    fn rank(&self) -> (bool, std::cmp::Reverse<Duration>) {
        (self.worker.is_some(), std::cmp::Reverse(self.at.elapsed()))
    }
}

fn start_database_worker(database: pg_sys::Oid, name: &str) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("{WORKER_TYPE} for {name}"))
        .set_type(WORKER_TYPE)
        .set_library("bussig")
        .set_function("bussig_worker_main")
        .set_argument(database.into_datum())
        .enable_spi_access()
        .set_restart_time(None)
        .load_dynamic()
        .ok()
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn bussig_worker_main(argument: pg_sys::Datum) {
    let database = pg_sys::Oid::from(argument.value() as u32);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    // Exit quietly where there is nothing to serve, or another worker already serves.
    let Some(Some(database_name)) = run_step("start", claim_database) else {
        return;
    };
    wakeup::register_worker();

    let mut last_count = None;
    // Where body collection goes on from: it examines a slice of the bodies each round.
    let mut bodies_after = 0;
    let maintenance_interval =
        || Duration::from_millis(gucs::MAINTENANCE_INTERVAL.get().max(1) as u64);
    let mut last_round: Option<Instant> = None;
    let mut warned_version = None;
    loop {
        reload_settings_if_asked();
        // A reload may take this database off bussig.worker_databases.
        if !database_allowed(&database_name) {
            return;
        }
        // Notifications go out at once, without a whole round: commits may ask for them thousands
        // of times a second.
        let fanout = send_notifications(false);
        // Due also when a reload shortened the interval.
        if fanout || last_round.is_none_or(|last| last.elapsed() >= maintenance_interval()) {
            // DROP EXTENSION ends the worker; one that waits for its lock (it may yet be cancelled,
            // fail or roll back) only holds off this round.
            let installed = match run_step("check", installed_version) {
                Some(Some(installed)) => Some(installed),
                None if background::extension_present() => None,
                _ => return,
            };
            last_round = Some(Instant::now());
            if installed.is_some_and(|installed| version_matches(&installed, &mut warned_version)) {
                run_round(&mut bodies_after, maintenance_interval());
                refresh_stats_when_due(&mut last_count);
            }
        }
        let next_round = last_round.map_or_else(Instant::now, |last| last + maintenance_interval());
        let until_round = next_round.saturating_duration_since(Instant::now());
        if !BackgroundWorker::wait_latch(Some(until_round)) {
            return;
        }
    }
}

/// This database's name when this worker is to serve it: the extension is there and no other
/// worker holds the database. Runs in a transaction (the name comes from the catalog cache).
fn claim_database() -> BusResult<Option<String>> {
    // The steps run the same few statements over and over: a JIT compile per run would cost more
    // than the work whenever a large table makes a plan look expensive.
    Spi::run("SET jit = off")?;
    // A step blocked by a consumer's row locks gives up and is retried next round, rather than
    // holding up every other step (fan-outs, expiry) in this database.
    Spi::run("SET lock_timeout = '1s'")?;
    Spi::run("SET statement_timeout = '5min'")?;
    // The worker is a superuser: no object anyone creates may stand in for a built-in one.
    Spi::run("SET search_path = pg_catalog, pg_temp")?;
    if installed_version()?.is_none() {
        return Ok(None);
    }
    let claimed = Spi::get_one_with_args::<bool>(
        "SELECT pg_try_advisory_lock($1)",
        &[WORKER_LOCK_KEY.into()],
    )?;
    Ok((claimed == Some(true)).then(current_database))
}

/// The version of bussig installed in this database; None once it is dropped.
fn installed_version() -> BusResult<Option<String>> {
    Ok(Spi::get_one::<String>(
        "SELECT extversion FROM pg_extension WHERE extname = 'bussig'",
    )?)
}

/// Whether the extension's SQL objects are the ones this library was built for. After the library
/// is replaced and before `ALTER EXTENSION bussig UPDATE`, the steps would fail on every round; they
/// wait instead, with one warning per version found.
fn version_matches(installed: &str, warned: &mut Option<String>) -> bool {
    let library = env!("CARGO_PKG_VERSION");
    if installed == library {
        return true;
    }
    if warned.as_deref() != Some(installed) {
        pgrx::warning!(
            "bussig worker: this database has bussig {installed} and the library is {library}; \
             maintenance waits for ALTER EXTENSION bussig UPDATE"
        );
        *warned = Some(installed.to_string());
    }
    false
}

/// Sends the NOTIFYs commits asked for since the last look, in one transaction; if that fails they
/// are kept for the next look. Whether a commit also handed over a fan-out; with `keep_fanout` (in
/// the middle of a round) that is left for the next look instead.
fn send_notifications(keep_fanout: bool) -> bool {
    let mut errands = wakeup::take_errands();
    let fanout = std::mem::take(&mut errands.fanout);
    if !errands.notify().is_empty() || errands.notify_all {
        let sent = run_step("notify", || {
            Spi::connect_mut(|client| {
                maintenance::notify(client, errands.notify(), errands.notify_all)
            })
        });
        if sent.is_none() {
            wakeup::return_errands(&errands);
        }
        // Commits that arrive meanwhile share the next notification transaction: under a fast
        // stream of notifying commits the worker then runs at most a few hundred a second instead
        // of one per commit, on cores the senders need.
        background::pause(NOTIFY_PAUSE_MICROS);
    }
    if fanout && keep_fanout {
        wakeup::return_errands(&Errands::fan_out());
        // So that the wait after this round ends at once.
        background::set_my_latch();
    }
    fanout && !keep_fanout
}

/// A step of a round, then the notifications asked for while it ran: a round over large tables takes
/// a while. Skipped once a fast shutdown or a forced DROP DATABASE asked the worker to end (the
/// main loop sees it next).
fn round_step<T>(
    name: &str,
    step: impl FnOnce() -> BusResult<T> + std::panic::UnwindSafe,
) -> Option<T> {
    if BackgroundWorker::sigterm_received() {
        return None;
    }
    let outcome = run_step(name, step);
    send_notifications(true);
    outcome
}

/// A step that handles up to `maintenance::BATCH` rows (per queue, for message expiry): how many.
type BatchStep = fn(&mut pgrx::spi::SpiClient<'_>) -> crate::error::BusResult<i64>;

/// Runs `step` again, each time in a transaction of its own, while its last run handled a full batch,
/// for at most `budget`: one batch a round fell further behind each round under a steady rate above
/// it (1,000 expired messages a second at the default interval).
fn repeated_while_full(name: &str, step: BatchStep, budget: Duration) {
    let started = Instant::now();
    while let Some(handled) = round_step(name, || Spi::connect_mut(step)) {
        if handled < i64::from(maintenance::BATCH) || started.elapsed() >= budget {
            break;
        }
    }
}

/// One round of every step, each in its own transaction. Fan-outs go a chunk per transaction, so that
/// a worker killed in the middle redoes at most one uncommitted chunk, until none is left or for one
/// maintenance interval: publishers that hand over fan-outs faster than they go would otherwise keep
/// every other step (lock expiry, TTL) from running. What is left goes on in the next round, at once.
fn run_round(bodies_after: &mut i64, fan_out_for: Duration) {
    let started = Instant::now();
    while let Some(Some(_)) = round_step("fan-out", || {
        Spi::connect_mut(|client| maintenance::fan_out_chunk(client, maintenance::BATCH))
    }) {
        if started.elapsed() >= fan_out_for {
            wakeup::return_errands(&Errands::fan_out());
            background::set_my_latch();
            break;
        }
    }
    let batch_steps: [(&str, BatchStep); 3] = [
        (
            "dead-lettering expired locks",
            maintenance::dead_letter_expired_locks,
        ),
        ("message expiry", maintenance::expire_messages),
        ("de-duplication key pruning", maintenance::prune_dedup_keys),
    ];
    for (name, step) in batch_steps {
        repeated_while_full(name, step, fan_out_for);
    }
    round_step("ephemeral queue expiry", || {
        Spi::connect_mut(maintenance::drop_expired_queues)
    });
    let after = *bodies_after;
    if let Some((_, next)) = round_step("body collection", || {
        Spi::connect_mut(|client| maintenance::collect_bodies(client, after))
    }) {
        *bodies_after = next.unwrap_or(0);
    }
    round_step("queue counts", || {
        Spi::connect_mut(stats::count_touched_queues)
    });
    round_step("orphan removal", || {
        Spi::connect_mut(maintenance::remove_orphans)
    });
    round_step("stream retention", || {
        Spi::connect_mut(crate::stream::retention::rotate_all)
    });
    round_step("stream bodies", || {
        Spi::connect_mut(crate::stream::body::collect)
    });
}

/// The statistics step reads the whole message table. Under a backlog of millions that takes seconds,
/// and every `bussig.stats_interval` it would keep the worker busy on cores the senders need; so the
/// next count waits at least this many times as long as the last one took, up to `STATS_PACED_GAP_MAX`.
const STATS_PACE: u32 = 20;
/// bussig.queues uses a count up to a minute old and counts a large queue itself after that.
const STATS_PACED_GAP_MAX: Duration = Duration::from_secs(50);

/// When the statistics step last ran, and how long it took.
struct LastCount {
    ended: Instant,
    took: Duration,
}

/// Whether the next statistics step is due, `interval` being bussig.stats_interval.
fn stats_due(last: Option<&LastCount>, interval: Duration) -> bool {
    last.is_none_or(|last| {
        let paced = (last.took * STATS_PACE).min(STATS_PACED_GAP_MAX);
        last.ended.elapsed() >= interval.max(paced)
    })
}

/// Recounts the queues for bussig.queues, and rewrites bloated tables, when bussig.stats_interval has
/// passed since the last time (longer after a long count: `STATS_PACE`).
fn refresh_stats_when_due(last: &mut Option<LastCount>) {
    let interval = Duration::from_millis(gucs::STATS_INTERVAL.get().max(1) as u64);
    if stats_due(last.as_ref(), interval) {
        let started = Instant::now();
        // In a transaction of its own, before anything takes a transaction id: a count is judged
        // against its snapshot only in a transaction without one. Inside the statistics step, after
        // its lock, it never counted anything (the prepared transactions' queues stayed short).
        round_step("depth recount", || Spi::connect_mut(crate::depth::recount));
        let counted = round_step("statistics", || Spi::connect_mut(stats::refresh_stats));
        let took = started.elapsed();
        // Compaction judges the message table by these counts: not by a round's older ones when
        // this round could not count (a run_maintenance() held the right to), as a table whose live
        // rows grew since could be rewritten, holding its senders and readers for long.
        if matches!(counted, Some(Some(_))) {
            round_step("compaction", || Spi::connect_mut(compaction::compact));
        }
        // Only a restore makes stream tables without their dependency: no need to look every round.
        round_step("restored stream tables", || {
            Spi::connect_mut(crate::stream::definition::adopt_restored)
        });
        *last = Some(LastCount {
            ended: Instant::now(),
            took,
        });
    }
}

#[cfg(test)]
mod schedule_tests {
    use super::*;

    #[test]
    fn a_long_count_spaces_out_the_next_ones() {
        let interval = Duration::from_secs(10);
        let quick = LastCount {
            ended: Instant::now() - Duration::from_secs(11),
            took: Duration::from_millis(50),
        };
        assert!(stats_due(Some(&quick), interval));
        let slow = LastCount {
            took: Duration::from_secs(1),
            ..quick
        };
        assert!(!stats_due(Some(&slow), interval));
        let long_ago = LastCount {
            ended: Instant::now() - Duration::from_secs(21),
            ..slow
        };
        assert!(stats_due(Some(&long_ago), interval));
        // A count of 10 s still leaves bussig.queues one less than a minute old.
        let very_slow = LastCount {
            ended: Instant::now() - Duration::from_secs(51),
            took: Duration::from_secs(10),
        };
        assert!(stats_due(Some(&very_slow), interval));
        assert!(stats_due(None, interval));
    }
}
