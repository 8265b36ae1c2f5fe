//! Workload 16: ordered message groups. A queue whose messages belong to many groups, consumed next to
//! the same queue without groups; and a read of a queue most of whose groups have their head out with
//! a consumer, next to a read of a queue holding only the ready messages. pgmq 1.13's `read_grouped`
//! (its FIFO groups, keyed by the `x-pgmq-group` header) on both rows.
use postgres::Client;

use crate::load::closed_loop;
use crate::pg::Res;
use crate::report::{format_value, no_cells, Cell, Section, Target};
use crate::systems::{ack_and_read_step, fill, reset, vacuum, Step, System, QUEUE};
use crate::workloads::{at_least, index_of, rate_cell};
use crate::Config;

const CLIENTS: usize = 4;
const BATCH: i32 = 10;
/// Groups whose head is out, and those whose head is ready, in the read row.
const BLOCKED: i64 = 99_000;
const FREE: i64 = 1_000;

const GROUPED: &str = "consume, messages in groups: ack_and_read(10); pgmq read_grouped + delete";
const UNGROUPED: &str = "consume, the same messages without groups: ack_and_read(10)";
const BLOCKED_READ: &str =
    "read(10), 99,000 of 100,000 groups with their head out; pgmq read_grouped";
const CLEAN_READ: &str = "read(10), a queue of the 1,000 ready messages only";

/// Messages and groups of the consume rows.
fn consume_sizes(cfg: &Config) -> (i64, i64) {
    if cfg.quick {
        (50_000, 500)
    } else {
        (1_000_000, 10_000)
    }
}

/// Sends `messages` to QUEUE, message i in group `g<i % groups>`, in calls of 10,000.
fn fill_groups(admin: &mut Client, system: System, messages: i64, groups: i64) -> Res<()> {
    let sql = match system {
        System::Bussig => {
            "SELECT count(*) FROM bussig.send_batch($1,
                 array(SELECT $2::text::jsonb FROM generate_series($3::bigint, $4::bigint)),
                 group_ids => array(SELECT 'g' || (i % $5::bigint) FROM generate_series($3::bigint, $4::bigint) i))"
        }
        System::Pgmq => {
            "SELECT count(*) FROM pgmq.send_batch($1,
                 array(SELECT $2::text::jsonb FROM generate_series($3::bigint, $4::bigint)),
                 array(SELECT jsonb_build_object('x-pgmq-group', 'g' || (i % $5::bigint))
                       FROM generate_series($3::bigint, $4::bigint) i))"
        }
        _ => unreachable!("only bussig and pgmq have message groups"),
    };
    let mut start = 0;
    while start < messages {
        let end = (start + 10_000).min(messages) - 1;
        admin.execute(sql, &[&QUEUE, &crate::pg::PAYLOAD, &start, &end, &groups])?;
        start = end + 1;
    }
    vacuum(admin, system)
}

/// pgmq's grouped consume: `read_grouped` then `delete`, two autocommit transactions.
fn pgmq_grouped_step(_: &mut Client) -> Res<Step> {
    Ok(Box::new(|c| {
        let ids: Vec<i64> = c
            .query(
                "SELECT msg_id FROM pgmq.read_grouped($1, 30, $2)",
                &[&QUEUE, &BATCH],
            )?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if !ids.is_empty() {
            c.execute("SELECT pgmq.delete($1, $2::bigint[])", &[&QUEUE, &ids])?;
        }
        Ok(ids.len() as u64)
    }))
}

/// One read of BATCH in a transaction rolled back, so that every read finds the same queue.
fn read_only_step(system: System) -> Step {
    let sql = match system {
        System::Bussig => "SELECT count(*) FROM bussig.read($1, $2)",
        _ => "SELECT count(*) FROM pgmq.read_grouped($1, 30, $2)",
    };
    Box::new(move |c| {
        let mut tx = c.transaction()?;
        let got: i64 = tx.query_one(sql, &[&QUEUE, &BATCH])?.get(0);
        tx.rollback()?;
        Ok(got as u64)
    })
}

/// Takes the heads of BLOCKED groups out for an hour, as consumers would hold them. False when one
/// call ran past PEER_PATIENCE (pgmq's read_grouped looks at every ready message of the queue).
fn block_heads(admin: &mut Client, system: System) -> Res<bool> {
    let sql = match system {
        System::Bussig => "SELECT count(*) FROM bussig.read($1, 1000, lock_timeout => '1 hour')",
        _ => "SELECT count(*) FROM pgmq.read_grouped($1, 3600, 1000)",
    };
    let mut out = 0;
    while out < BLOCKED {
        let got: i64 = match patiently(admin, |c| Ok(c.query_one(sql, &[&QUEUE])?.get(0)))? {
            Some(got) => got,
            None => return Ok(false),
        };
        if got == 0 {
            break;
        }
        out += got;
    }
    vacuum(admin, system)?;
    Ok(true)
}

/// The longest one call may take before a row gives up on it.
const PEER_PATIENCE: &str = "60s";

/// Runs `call` under a statement timeout of PEER_PATIENCE: None when it ran past it.
fn patiently<T>(admin: &mut Client, call: impl FnOnce(&mut Client) -> Res<T>) -> Res<Option<T>> {
    admin.batch_execute(&format!("SET statement_timeout = '{PEER_PATIENCE}'"))?;
    let result = call(admin);
    admin.batch_execute("RESET statement_timeout")?;
    match result {
        Ok(value) => Ok(Some(value)),
        Err(error) if timed_out(error.as_ref()) => Ok(None),
        Err(error) => Err(error),
    }
}

fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    error
        .downcast_ref::<postgres::Error>()
        .and_then(postgres::Error::code)
        .is_some_and(|code| *code == postgres::error::SqlState::QUERY_CANCELED)
}

fn gave_up() -> Cell {
    Cell {
        value: f64::NAN,
        detail: format!("a call ran past {PEER_PATIENCE}"),
    }
}

pub fn groups(cfg: &Config, admin: &mut Client, targets: &mut Vec<Target>) -> Res<Section> {
    let (messages, groups) = consume_sizes(cfg);
    let mut section = Section::new(
        "16. Ordered message groups",
        "msgs/s",
        &format!(
            "Consume rows: {} messages, message i in group i mod {}, consumed by {CLIENTS} clients \
             (bussig `ack_and_read(10)`, one message of a group out at a time; pgmq `read_grouped(queue, \
             30, 10)` then `delete`), next to the same messages without groups. Read rows: 100,000 \
             groups of two messages, the heads of 99,000 of them read with an hour's lock, then one \
             client reading 10 in a transaction it rolls back, next to a queue holding only the 1,000 \
             ready messages.",
            format_value(messages as f64),
            format_value(groups as f64)
        ),
    );
    let mut grouped = no_cells();
    for system in [System::Bussig, System::Pgmq] {
        reset(admin, system)?;
        fill_groups(admin, system, messages, groups)?;
        // One read first, rolled back: a peer whose read takes minutes gets no loop of them.
        let probe = patiently(admin, |c| read_only_step(system)(c))?;
        if probe.is_none() {
            grouped[index_of(system)] = Some(gave_up());
            continue;
        }
        let outcome = closed_loop(&cfg.url, CLIENTS, cfg.run, true, |c, _| match system {
            System::Bussig => ack_and_read_step(c, QUEUE, BATCH),
            _ => pgmq_grouped_step(c),
        })?;
        grouped[index_of(system)] = Some(rate_cell(&outcome));
    }
    section.add(GROUPED, Some(CLIENTS), grouped);
    reset(admin, System::Bussig)?;
    fill(admin, System::Bussig, QUEUE, messages)?;
    vacuum(admin, System::Bussig)?;
    let outcome = closed_loop(&cfg.url, CLIENTS, cfg.run, true, |c, _| {
        ack_and_read_step(c, QUEUE, BATCH)
    })?;
    section.add(
        UNGROUPED,
        Some(CLIENTS),
        crate::report::only(System::Bussig, rate_cell(&outcome)),
    );

    let mut blocked = no_cells();
    for system in [System::Bussig, System::Pgmq] {
        reset(admin, system)?;
        fill_groups(admin, system, 2 * (BLOCKED + FREE), BLOCKED + FREE)?;
        if !block_heads(admin, system)? {
            blocked[index_of(system)] = Some(gave_up());
            continue;
        }
        let outcome = closed_loop(&cfg.url, 1, cfg.run, false, |_, _| {
            Ok(read_only_step(system))
        })?;
        blocked[index_of(system)] = Some(rate_cell(&outcome));
    }
    section.add(BLOCKED_READ, Some(1), blocked);
    reset(admin, System::Bussig)?;
    fill(admin, System::Bussig, QUEUE, FREE)?;
    vacuum(admin, System::Bussig)?;
    let outcome = closed_loop(&cfg.url, 1, cfg.run, false, |_, _| {
        Ok(read_only_step(System::Bussig))
    })?;
    section.add(
        CLEAN_READ,
        Some(1),
        crate::report::only(System::Bussig, rate_cell(&outcome)),
    );

    let bussig = |row: &str, clients: usize| section.value(row, Some(clients), System::Bussig);
    let versus = |a: Option<f64>, b: Option<f64>| a.zip(b).map_or(f64::NAN, |(a, b)| a / b);
    targets.push(at_least(
        "grouped consume vs the same messages ungrouped".into(),
        versus(bussig(GROUPED, CLIENTS), bussig(UNGROUPED, CLIENTS)),
        0.8,
    ));
    targets.push(at_least(
        "read with 99,000 groups' heads out vs a clean queue's read".into(),
        versus(bussig(BLOCKED_READ, 1), bussig(CLEAN_READ, 1)),
        0.5,
    ));
    Ok(section)
}
