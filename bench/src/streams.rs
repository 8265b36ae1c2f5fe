//! Workload 17: streams. Appends (single and batches of 100) against the hand-written queue's INSERT;
//! a consumer group reading 100 records and committing them against the hand-written SKIP LOCKED
//! consume and PgQ's `next_batch`/`finish_batch`, from a pre-filled backlog.
use std::time::{Duration, Instant};

use postgres::types::Type;
use postgres::Client;

use crate::load::closed_loop;
use crate::pg::{connect, payloads, JsonbText, Res, Samples, PAYLOAD};
use crate::report::{format_value, no_cells, Cell, Section, Target};
use crate::systems::{
    batch_sender, prefill, receive, reset, Consumer, Sender, Step, System, QUEUE,
};
use crate::workloads::{at_least, index_of, rate_cell};
use crate::Config;

const STREAM: &str = "bench_stream";
pub const GROUP: &str = "bench";
/// Partitions of the stream: as many members as this can read at once.
const PARTITIONS: i32 = 4;
const BATCH: i32 = 100;
const CLIENTS: [usize; 2] = [1, 2];

const APPEND: &str = "append one record; hand-written INSERT";
const APPEND_BATCH: &str = "append_batch of 100; hand-written INSERT of 100";
const LATENCY: &str =
    "append-to-read latency at 1,000 records/s, a member waiting in stream_read (p99 ms)";
const GROUP_READ: &str =
    "group read 100 + commit; hand-written SKIP LOCKED read 100 + DELETE; PgQ next_batch + finish_batch";

/// Drops and makes the stream again, with its group at the start.
fn reset_stream(admin: &mut Client) -> Res<()> {
    admin.execute("SELECT bussig.drop_stream($1)", &[&STREAM])?;
    admin.execute(
        "SELECT bussig.create_stream($1, $2, retention => '1 day')",
        &[&STREAM, &PARTITIONS],
    )?;
    admin.execute(
        "SELECT bussig.create_consumer_group($1, $2, 'earliest')",
        &[&STREAM, &GROUP],
    )?;
    Ok(())
}

fn append_step(client: &mut Client) -> Res<Step> {
    let statement =
        client.prepare_typed("SELECT bussig.append($1, $2)", &[Type::TEXT, Type::JSONB])?;
    Ok(Box::new(move |c| {
        c.query_one(&statement, &[&STREAM, &JsonbText(PAYLOAD)])?;
        Ok(1)
    }))
}

fn append_batch_step(client: &mut Client) -> Res<Step> {
    let statement = client.prepare_typed(
        "SELECT bussig.append_batch($1, $2)",
        &[Type::TEXT, Type::JSONB_ARRAY],
    )?;
    let batch = payloads(BATCH as usize);
    Ok(Box::new(move |c| {
        c.query_one(&statement, &[&STREAM, &batch])?;
        Ok(BATCH as u64)
    }))
}

/// A member's loop: read up to 100 in one autocommit transaction, commit each partition's last in
/// the next, as the hand-written consumer reads and deletes.
fn group_step(client: &mut Client) -> Res<Step> {
    member_step(client, STREAM, "0")
}

/// A member of GROUP in `stream`, its read waiting up to `wait` (an interval) when there is nothing.
pub fn member_step(client: &mut Client, stream: &'static str, wait: &str) -> Res<Step> {
    let read = client.prepare_typed(
        &format!(
            "SELECT partition, seq, lease_token, payload FROM bussig.stream_read($1, $2, $3, wait => '{wait}')"
        ),
        &[Type::TEXT, Type::TEXT, Type::INT4],
    )?;
    let commit = client.prepare_typed(
        "SELECT count(*) FILTER (WHERE bussig.stream_commit($1, $2, p, s, t))
         FROM unnest($3::int[], $4::bigint[], $5::uuid[]) AS last(p, s, t)",
        &[
            Type::TEXT,
            Type::TEXT,
            Type::INT4_ARRAY,
            Type::INT8_ARRAY,
            Type::UUID_ARRAY,
        ],
    )?;
    Ok(Box::new(move |c| {
        let rows = c.query(&read, &[&stream, &GROUP, &BATCH])?;
        receive(&rows, 3);
        let mut last: Vec<(i32, i64, uuid::Uuid)> = Vec::new();
        for row in &rows {
            let (partition, seq, token): (i32, i64, uuid::Uuid) =
                (row.get(0), row.get(1), row.get(2));
            match last.iter_mut().find(|(p, _, _)| *p == partition) {
                Some(entry) => entry.1 = entry.1.max(seq),
                None => last.push((partition, seq, token)),
            }
        }
        if !last.is_empty() {
            let partitions: Vec<i32> = last.iter().map(|l| l.0).collect();
            let seqs: Vec<i64> = last.iter().map(|l| l.1).collect();
            let tokens: Vec<uuid::Uuid> = last.iter().map(|l| l.2).collect();
            c.query_one(&commit, &[&stream, &GROUP, &partitions, &seqs, &tokens])?;
        }
        Ok(rows.len() as u64)
    }))
}

/// Appends `count` records in batches of 10,000 and numbers them (a read numbers what it finds).
fn fill_stream(admin: &mut Client, count: i64) -> Res<()> {
    let mut left = count;
    while left > 0 {
        let n = left.min(10_000);
        admin.execute(
            "SELECT bussig.append_batch($1, array(SELECT $2::text::jsonb FROM generate_series(1, $3::bigint)))",
            &[&STREAM, &PAYLOAD, &n],
        )?;
        left -= n;
    }
    admin.execute(
        "SELECT count(*) FROM generate_series(0, $2 - 1) p, bussig.stream_range($1, p, 1, 1)",
        &[&STREAM, &PARTITIONS],
    )?;
    admin.batch_execute("VACUUM (ANALYZE) bussig.stream_partition, bussig.group_partition")?;
    Ok(())
}

fn backlog(cfg: &Config) -> i64 {
    if cfg.quick {
        50_000
    } else {
        200_000
    }
}

/// Records a second the latency row's appender offers.
const RATE: u64 = 1_000;

/// One appender offering RATE records a second (open loop, one autocommit append each) while one
/// member waits in stream_read: the time from each append's insert (`appended_at`) to the read that
/// returned it, in milliseconds, at the 50th and 99th percentile.
fn append_to_read(cfg: &Config) -> Res<(f64, f64, usize)> {
    let mut latencies: Vec<f64> = Vec::new();
    std::thread::scope(|scope| -> Res<()> {
        let appender = scope.spawn(|| -> Res<()> {
            let mut c = connect(&cfg.url)?;
            let append =
                c.prepare_typed("SELECT bussig.append($1, $2)", &[Type::TEXT, Type::JSONB])?;
            let started = Instant::now();
            let mut sent: u64 = 0;
            while started.elapsed() < cfg.run {
                let due = started + Duration::from_micros(sent * 1_000_000 / RATE);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                c.query_one(&append, &[&STREAM, &JsonbText(PAYLOAD)])?;
                sent += 1;
            }
            Ok(())
        });
        let mut c = connect(&cfg.url)?;
        let read = c.prepare_typed(
            "SELECT partition, seq, lease_token,
                    extract(epoch FROM clock_timestamp() - appended_at)::float8 * 1000
             FROM bussig.stream_read($1, $2, 100, wait => '200 milliseconds')",
            &[Type::TEXT, Type::TEXT],
        )?;
        let commit = c.prepare_typed(
            "SELECT bussig.stream_commit($1, $2, $3, $4, $5)",
            &[Type::TEXT, Type::TEXT, Type::INT4, Type::INT8, Type::UUID],
        )?;
        let mut idle_after_end = 0;
        while idle_after_end < 3 {
            let rows = c.query(&read, &[&STREAM, &GROUP])?;
            if rows.is_empty() && appender.is_finished() {
                idle_after_end += 1;
            }
            let mut last: Vec<(i32, i64, uuid::Uuid)> = Vec::new();
            for row in &rows {
                latencies.push(row.get(3));
                let (partition, seq, token): (i32, i64, uuid::Uuid) =
                    (row.get(0), row.get(1), row.get(2));
                match last.iter_mut().find(|(p, _, _)| *p == partition) {
                    Some(entry) => entry.1 = entry.1.max(seq),
                    None => last.push((partition, seq, token)),
                }
            }
            for (partition, seq, token) in last {
                c.query_one(&commit, &[&STREAM, &GROUP, &partition, &seq, &token])?;
            }
        }
        appender.join().map_err(|_| "the appender panicked")??;
        Ok(())
    })?;
    let count = latencies.len();
    let samples = Samples::new(latencies);
    Ok((samples.percentile(50.0), samples.percentile(99.0), count))
}

pub fn streams(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let mut section = Section::new(
        "17. Streams",
        "msgs/s",
        &format!(
            "bussig appends to a stream of {PARTITIONS} partitions, against the hand-written queue's INSERT. \
             Group rows: {} records appended beforehand (bussig: numbered by one read first; PgQ: ticked \
             every 500 events), consumed by a group's members reading 100 and committing each \
             partition's last (two transactions), the hand-written queue's SKIP LOCKED read of 100 and \
             DELETE (two transactions), PgQ's next_batch, get_batch_events and finish_batch (one). Latency row: one appender offering \
             1,000 records/s in autocommit appends, one member waiting in stream_read(100, wait 200 ms) and \
             committing; from each record's appended_at to the read that returned it.",
            format_value(backlog(cfg) as f64)
        ),
    );
    let mut append_rows: Vec<(usize, f64, f64)> = Vec::new();
    let mut batch_rows: Vec<(usize, f64, f64)> = Vec::new();
    for clients in CLIENTS {
        reset_stream(admin)?;
        reset(admin, System::Hand)?;
        let bussig = closed_loop(&cfg.url, clients, cfg.run, false, |c, _| append_step(c))?;
        let hand = closed_loop(&cfg.url, clients, cfg.run, false, |c, _| {
            Ok(Sender::new(c, System::Hand, QUEUE, false)?.step())
        })?;
        append_rows.push((clients, bussig.rate(), hand.rate()));
        section.add(APPEND, Some(clients), two(&bussig, &hand));
        reset_stream(admin)?;
        reset(admin, System::Hand)?;
        let bussig = closed_loop(&cfg.url, clients, cfg.run, false, |c, _| {
            append_batch_step(c)
        })?;
        let hand = closed_loop(&cfg.url, clients, cfg.run, false, |c, _| {
            batch_sender(c, System::Hand, BATCH as usize)
        })?;
        batch_rows.push((clients, bussig.rate(), hand.rate()));
        section.add(APPEND_BATCH, Some(clients), two(&bussig, &hand));
    }
    let mut group_rows = Vec::new();
    for clients in CLIENTS {
        let mut cells = no_cells();
        reset_stream(admin)?;
        fill_stream(admin, backlog(cfg))?;
        let bussig = closed_loop(&cfg.url, clients, cfg.run, true, |c, _| group_step(c))?;
        cells[index_of(System::Bussig)] = Some(rate_cell(&bussig));
        for peer in [System::Hand, System::Pgq] {
            reset(admin, peer)?;
            prefill(admin, peer, backlog(cfg))?;
            let outcome = closed_loop(&cfg.url, clients, cfg.run, true, |c, _| {
                Ok(Consumer::new(c, peer, QUEUE, BATCH, None)?.step())
            })?;
            cells[index_of(peer)] = Some(rate_cell(&outcome));
        }
        section.add(GROUP_READ, Some(clients), cells);
        group_rows.push(clients);
    }
    reset_stream(admin)?;
    let (p50, p99, count) = append_to_read(cfg)?;
    section.add(
        LATENCY,
        Some(1),
        crate::report::only(
            System::Bussig,
            Cell {
                value: p99,
                detail: format!("p99 ms; p50 {p50:.1} ms over {count} records"),
            },
        ),
    );
    targets.push(Target {
        name: format!("append-to-read latency p99 at {RATE} records/s"),
        measured: format!("{p99:.1} ms"),
        goal: "< 10 ms".into(),
        pass: p99 < 10.0,
    });
    admin.execute("SELECT bussig.drop_stream($1)", &[&STREAM])?;
    reset(admin, System::Hand)?;
    reset(admin, System::Pgq)?;

    for (rows, what) in [
        (&append_rows, "append"),
        (&batch_rows, "append_batch of 100"),
    ] {
        for &(clients, bussig, hand) in rows {
            targets.push(at_least(
                format!("{what} vs hand-written INSERT, {clients} client(s)"),
                bussig / hand,
                0.9,
            ));
        }
    }
    for clients in group_rows {
        let value = |system| section.value(GROUP_READ, Some(clients), system);
        let ratio = value(System::Bussig)
            .zip(value(System::Hand))
            .map_or(f64::NAN, |(b, h)| b / h);
        targets.push(at_least(
            format!(
                "group read 100 + commit vs hand-written SKIP LOCKED consume, {clients} client(s)"
            ),
            ratio,
            5.0,
        ));
    }
    Ok(section)
}

/// A row's cells: bussig's and the hand-written queue's.
fn two(bussig: &crate::load::Outcome, hand: &crate::load::Outcome) -> crate::report::Cells {
    let mut cells = no_cells();
    cells[index_of(System::Bussig)] = Some(rate_cell(bussig));
    cells[index_of(System::Hand)] = Some(Cell {
        value: hand.rate(),
        detail: String::new(),
    });
    cells
}
