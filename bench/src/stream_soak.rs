//! Workload 18, the streams' soak: one appender at a steady rate and one group member reading 100
//! and committing, for the soak's length, with a REPEATABLE READ transaction holding a transaction
//! id for the hold's length in the middle, and retention short enough that segments are emptied
//! several times. Throughput per interval, the stream's size against the live records', and the
//! dead rows each of its tables gathered.
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::types::Type;
use postgres::Client;

use crate::pg::{connect, payloads, sleep_until, Res};
use crate::report::{format_value, only, Cell, Section, Target};
use crate::soak::{drift_target, hold_snapshot, SoakPlan};
use crate::streams::{member_step, GROUP};
use crate::systems::System;
use crate::Config;

const STREAM: &str = "bench_soak_stream";
const PARTITIONS: i32 = 4;
const BATCH: usize = 10;

/// The stream's storage at one moment: its segment tables' bytes (indexes and TOAST included), the
/// bytes of the records kept as rows, how many, and the dead rows of its segment tables and of the
/// group's tables (positions and leases).
struct Storage {
    bytes: i64,
    live_bytes: i64,
    records: i64,
    segment_dead: i64,
    group_dead: i64,
}

fn storage(admin: &mut Client) -> Res<Storage> {
    let table: String = admin
        .query_one(
            "SELECT format('bussig.stream_%s', stream_id) FROM bussig.stream WHERE name = $1",
            &[&STREAM],
        )?
        .get(0);
    let row = admin.query_one(
        &format!(
            "SELECT (SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::bigint
                     FROM pg_inherits WHERE inhparent = '{table}'::regclass),
                    (SELECT coalesce(sum(pg_column_size(r.*)), 0)::bigint FROM {table} r WHERE r.seq IS NOT NULL),
                    (SELECT count(*) FROM {table} WHERE seq IS NOT NULL),
                    (SELECT coalesce(sum(n_dead_tup), 0)::bigint FROM pg_stat_user_tables s
                     JOIN pg_inherits i ON i.inhrelid = s.relid WHERE i.inhparent = '{table}'::regclass),
                    (SELECT coalesce(sum(n_dead_tup), 0)::bigint FROM pg_stat_user_tables
                     WHERE schemaname = 'bussig' AND relname IN ('group_partition', 'group_lease', 'stream_partition'))"
        ),
        &[],
    )?;
    Ok(Storage {
        bytes: row.get(0),
        live_bytes: row.get(1),
        records: row.get(2),
        segment_dead: row.get(3),
        group_dead: row.get(4),
    })
}

fn mb(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn stream_soak(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let duration = cfg.soak.as_secs_f64();
    // Segments close every half retention and are emptied past it: several times in the soak.
    let retention = format!("{} seconds", (cfg.soak.as_secs() / 6).max(5));
    admin.execute("SELECT bussig.drop_stream($1)", &[&STREAM])?;
    admin.execute(
        "SELECT bussig.create_stream($1, $2, retention => $3::text::interval)",
        &[&STREAM, &PARTITIONS, &retention],
    )?;
    admin.execute(
        "SELECT bussig.create_consumer_group($1, $2, 'earliest')",
        &[&STREAM, &GROUP],
    )?;
    let plan = SoakPlan::of(cfg);
    let (interval, intervals, window) = (plan.interval, plan.intervals, plan.window);
    let (hold_start, hold_end) = (plan.hold_start, plan.hold_end);
    let running = AtomicBool::new(true);
    let start = Instant::now();
    let at = |seconds: f64| start + Duration::from_secs_f64(seconds);

    let (consumed, moments) = std::thread::scope(|scope| -> Res<_> {
        let running = &running;
        let appender = scope.spawn(move || -> Res<()> {
            let mut client = connect(&cfg.url)?;
            let append = client.prepare_typed(
                "SELECT bussig.append_batch($1, $2)",
                &[Type::TEXT, Type::JSONB_ARRAY],
            )?;
            let batch = payloads(BATCH);
            let pause = Duration::from_secs_f64(BATCH as f64 / cfg.soak_rate);
            let mut next = start;
            while running.load(Ordering::Relaxed) {
                sleep_until(next);
                client.query_one(&append, &[&STREAM, &batch])?;
                next += pause;
            }
            Ok(())
        });
        let member = scope.spawn(move || -> Res<Vec<u64>> {
            let mut client = connect(&cfg.url)?;
            let mut step = member_step(&mut client, STREAM, "100 milliseconds")?;
            let mut consumed = vec![0u64; intervals];
            while running.load(Ordering::Relaxed) {
                let read = step(&mut client)?;
                let slot = (start.elapsed().as_secs_f64() / interval) as usize;
                if slot >= intervals {
                    break;
                }
                consumed[slot] += read;
            }
            Ok(consumed)
        });
        let holder = scope.spawn(move || hold_snapshot(&cfg.url, at(hold_start), at(hold_end)));
        // The end of the first window (steady state), just before the held transaction ends, a
        // retention after it ended, and the end.
        let after_hold = (hold_end + cfg.soak.as_secs_f64() / 4.0).min(duration - 1.0);
        let mut moments = Vec::new();
        for (label, moment) in [
            ("steady state", window as f64 * interval),
            ("held transaction about to end", hold_end - 1.0),
            ("a while after it ended", after_hold),
            ("end", duration - 0.5),
        ] {
            sleep_until(at(moment));
            moments.push((label, storage(admin)?));
        }
        sleep_until(at(duration));
        running.store(false, Ordering::Relaxed);
        appender.join().expect("appender panicked")?;
        holder.join().expect("holder panicked")?;
        let consumed = member.join().expect("member panicked")?;
        Ok((consumed, moments))
    })?;
    let lag: i64 = admin
        .query_one(
            "SELECT coalesce(sum(lag), 0)::bigint FROM bussig.consumer_groups WHERE stream = $1",
            &[&STREAM],
        )?
        .get(0);
    admin.execute("SELECT bussig.drop_stream($1)", &[&STREAM])?;

    let mut section = Section::new(
        "18. Streams: soak",
        "records/s",
        &format!(
            "{} s: one appender of batches of {BATCH} at a steady {} records/s into a stream of \
             {PARTITIONS} partitions (retention {retention}), one group member reading 100 \
             (waiting up to 100 ms) and committing each partition's last. A REPEATABLE READ transaction \
             with a transaction id is held from {hold_start:.0} s to {hold_end:.0} s. Records read per \
             second in each {interval:.0}-second interval; then the stream's size (its segment tables, \
             indexes and TOAST included) against its live records' (the rows kept, `pg_column_size`), \
             and the dead rows of the segment tables (numbering's first versions, emptied with their \
             segment) and of the group's tables (positions, leases, partitions' heads).",
            format_value(duration),
            format_value(cfg.soak_rate)
        ),
    );
    for (slot, count) in consumed.iter().enumerate() {
        let from = slot as f64 * interval;
        section.add(
            &format!("{from:.0}-{:.0} s", from + interval),
            None,
            only(
                System::Bussig,
                Cell {
                    value: *count as f64 / interval,
                    detail: String::new(),
                },
            ),
        );
    }
    for (label, s) in &moments {
        section.add(
            &format!("size (MB), {label}"),
            None,
            only(
                System::Bussig,
                Cell {
                    value: mb(s.bytes),
                    detail: format!(
                        "live {} MB in {} records; dead rows: segments {}, group tables {}",
                        format_value(mb(s.live_bytes)),
                        format_value(s.records as f64),
                        format_value(s.segment_dead as f64),
                        format_value(s.group_dead as f64)
                    ),
                },
            ),
        );
    }
    let note = format!(" (lag at the end {lag})");
    targets.push(drift_target(
        "stream soak",
        &consumed,
        window,
        interval,
        &note,
    ));
    let (_, end) = &moments[moments.len() - 1];
    let over_live = end.bytes as f64 / end.live_bytes.max(1) as f64;
    let (_, steady) = &moments[0];
    let steady_over_live = steady.bytes as f64 / steady.live_bytes.max(1) as f64;
    targets.push(Target {
        name: "stream soak: size at the end vs its live records' (steady state's in brackets)"
            .into(),
        measured: format!("{over_live:.2}x ({steady_over_live:.2}x)"),
        goal: "< 2x".into(),
        pass: over_live < 2.0,
    });
    Ok(section)
}
