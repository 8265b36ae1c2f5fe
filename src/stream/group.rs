//! Consumer groups: each keeps its own position in every partition of its stream.
use std::cell::{Cell, RefCell};
use std::collections::HashSet;

use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use super::{require, sequence, Stream, StreamPrivilege};
use crate::access::Caller;
use crate::error::{BusError, BusResult};
use crate::pg::{invalidation, xact};
use crate::plans::{self, Statement};

/// Where a new group starts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StartAt {
    /// The oldest record kept.
    Earliest,
    /// After every record readable now.
    Latest,
}

impl StartAt {
    pub fn parse(start_at: &str) -> BusResult<StartAt> {
        match start_at {
            "earliest" => Ok(StartAt::Earliest),
            "latest" => Ok(StartAt::Latest),
            other => Err(BusError::invalid(
                "start_at",
                format!("{other:?} is neither 'earliest' nor 'latest'"),
            )),
        }
    }
}

static INSERT_GROUP: Statement = Statement {
    sql: "INSERT INTO bussig.consumer_group (stream_id, consumer_group) VALUES ($1, $2)
          ON CONFLICT DO NOTHING RETURNING true",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

// Earliest: before the first record kept; latest: at the head, numbered just before.
static INSERT_POSITIONS: Statement = Statement {
    sql: "INSERT INTO bussig.group_partition (stream_id, consumer_group, partition, committed_seq)
          SELECT stream_id, $2, partition, CASE WHEN $3 THEN head_seq ELSE first_seq - 1 END
          FROM bussig.stream_partition WHERE stream_id = $1",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID, pg_sys::BOOLOID],
    writes: true,
};

static DELETE_GROUP: Statement = Statement {
    sql: "DELETE FROM bussig.consumer_group WHERE stream_id = $1 AND consumer_group = $2 RETURNING true",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

// A writing statement: a new snapshot, so that a group another transaction just made is found.
static GROUP_EXISTS: Statement = Statement {
    sql: "SELECT true FROM bussig.consumer_group WHERE stream_id = $1 AND consumer_group = $2",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

// The group's lease rows, made again after a crash emptied the unlogged table.
static ENSURE_LEASES: Statement = Statement {
    sql: "INSERT INTO bussig.group_lease (stream_id, consumer_group, partition)
          SELECT stream_id, consumer_group, partition FROM bussig.group_partition
          WHERE stream_id = $1 AND consumer_group = $2
          ON CONFLICT DO NOTHING RETURNING true",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

thread_local! {
    /// The groups whose lease rows this backend found made (stream id, group), with the generation of
    /// bussig's objects they were found in. A crash empties the unlogged lease table, and ends every
    /// backend with it.
    static LEASES_MADE: RefCell<(u64, HashSet<(i32, String)>)> = RefCell::new((0, HashSet::new()));
}

const LEASES_MADE_LIMIT: usize = 10_000;

thread_local! {
    /// The transaction in which this backend last made lease rows: while it runs, finding rows may
    /// be finding its own, which a rollback takes back.
    static LEASES_MADE_IN: Cell<u32> = const { Cell::new(0) };
}

/// Makes the group's lease rows (those missing); whether it made any.
fn make_leases(client: &mut SpiClient<'_>, stream: &Stream, group: &str) -> BusResult<bool> {
    let args = [stream.stream_id.into(), group.into()];
    let made = !plans::run(client, &ENSURE_LEASES, &args)?.is_empty();
    if made {
        LEASES_MADE_IN.with(|made_in| made_in.set(xact::top_transaction_id()));
    }
    Ok(made)
}

/// Makes the group's lease rows unless this backend did already.
pub fn make_sure_of_leases(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    group: &str,
) -> BusResult<()> {
    let generation = invalidation::generation(client)?;
    let key = (stream.stream_id, group.to_string());
    let known = LEASES_MADE.with(|made| {
        let made = made.borrow();
        made.0 == generation && made.1.contains(&key)
    });
    if known {
        return Ok(());
    }
    let this = xact::top_transaction_id();
    if make_leases(client, stream, group)? || (this != 0 && LEASES_MADE_IN.with(Cell::get) == this)
    {
        // Made in this transaction, which may roll back: known once a later one finds them.
        return Ok(());
    }
    LEASES_MADE.with(|made| {
        let mut made = made.borrow_mut();
        if made.0 != generation || made.1.len() >= LEASES_MADE_LIMIT {
            *made = (generation, HashSet::new());
        }
        made.1.insert(key);
    });
    Ok(())
}

/// create_consumer_group: false when the group existed (left untouched).
pub fn create(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    group: &str,
    start_at: StartAt,
) -> BusResult<bool> {
    let stream = require(client, caller, name, StreamPrivilege::Manage)?;
    let args = [stream.stream_id.into(), group.into()];
    if plans::first_value::<bool>(client, &INSERT_GROUP, &args)?.is_none() {
        return Ok(false);
    }
    if start_at == StartAt::Latest {
        sequence::number_all(client, &stream)?;
    }
    let args = [
        stream.stream_id.into(),
        group.into(),
        (start_at == StartAt::Latest).into(),
    ];
    plans::run(client, &INSERT_POSITIONS, &args)?;
    plans::run(
        client,
        &ENSURE_LEASES,
        &[stream.stream_id.into(), group.into()],
    )?;
    Ok(true)
}

/// drop_consumer_group: false when there was no such group.
pub fn drop(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    group: &str,
) -> BusResult<bool> {
    let stream = require(client, caller, name, StreamPrivilege::Manage)?;
    // The lease rows before the positions (which the delete's cascade takes), as a commit takes them.
    super::lease::end(client, &stream, group, None, None)?;
    let args = [stream.stream_id.into(), group.into()];
    Ok(plans::first_value::<bool>(client, &DELETE_GROUP, &args)?.is_some())
}

/// 42704 unless the stream has the group.
pub fn require_group(
    client: &mut SpiClient<'_>,
    name: &str,
    stream: &Stream,
    group: &str,
) -> BusResult<()> {
    let args = [stream.stream_id.into(), group.into()];
    match plans::first_value::<bool>(client, &GROUP_EXISTS, &args)? {
        Some(true) => Ok(()),
        _ => Err(BusError::UnknownConsumerGroup {
            stream: name.to_string(),
            group: group.to_string(),
        }),
    }
}
