//! Streams: retained logs. Records are appended without a sequence number; a reader (or the worker)
//! numbers the committed ones under their partition's row lock before it reads, so `seq` is
//! contiguous and follows the order records become readable, and an open appending transaction
//! holds nobody back. Each stream's records live in its own table, a ring of segments that retention
//! empties whole. The SQL functions are in `api/streams.rs`; design in docs/design.md ("Streams").
// The domain is written against SPI and `pg`: no unsafe code of its own.
#![deny(unsafe_code)]
pub mod append;
pub mod body;
pub mod definition;
pub mod group;
pub mod lease;
pub mod read;
pub mod retention;
pub mod sequence;
pub mod subscription;
#[cfg(any(test, feature = "pg_test"))]
mod tests;
#[cfg(any(test, feature = "pg_test"))]
mod tests_read;

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use crate::access::held::On;
use crate::access::Caller;
use crate::error::{BusError, BusResult};
use crate::pg::{identity, invalidation};
use crate::plans::{self, Statement};
use crate::validate;

/// Segments in each stream's ring: one taking appends, the rest closed until retention empties them.
pub const SEGMENTS: i32 = 4;
pub const MAX_PARTITIONS: i32 = 256;

/// A segment's table (of records, or of shared bodies) that readers use is free only between their
/// statements: retention and the body collection try for its lock this often, this far apart.
pub const SEGMENT_LOCK_TRIES: u32 = 20;
pub const SEGMENT_LOCK_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// What a role may do with one stream (`bussig.grant`); a stream's owner may do all of it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StreamPrivilege {
    /// append, append_batch, and receiving publishes
    Append,
    /// stream_read, stream_commit, stream_range, stream_seek, stream_seek_time
    Read,
    /// alter, drop, consumer groups, subscribe_stream, unsubscribe_stream
    Manage,
}

impl StreamPrivilege {
    pub const ALL: [StreamPrivilege; 3] = [
        StreamPrivilege::Append,
        StreamPrivilege::Read,
        StreamPrivilege::Manage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StreamPrivilege::Append => "append",
            StreamPrivilege::Read => "read",
            StreamPrivilege::Manage => "manage",
        }
    }
}

/// A stream as the SQL functions need it.
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    pub stream_id: i32,
    pub partitions: i32,
    /// The segment appends went to when the stream was looked up (see `find`).
    pub current_segment: i32,
}

impl Stream {
    /// The table holding the stream's records, partitioned by segment.
    pub fn table(&self) -> String {
        table_of(self.stream_id)
    }
}

pub fn table_of(stream_id: i32) -> String {
    format!("bussig.stream_{stream_id}")
}

// A writing statement, so that it reads with a new snapshot. The row's xmin tells whether this
// transaction wrote it.
static FIND: Statement = Statement {
    sql: "SELECT stream_id, partitions, current_segment, xmin::text::bigint FROM bussig.stream WHERE name = $1",
    args: &[pg_sys::TEXTOID],
    writes: true,
};

/// Streams a backend remembers before it starts over.
const KNOWN_STREAMS_LIMIT: usize = 10_000;

thread_local! {
    /// Streams this backend looked up by name, and the invalidation generation they belong to: a
    /// stream's id and partitions never change, and a drop or rename invalidates (a trigger).
    static KNOWN: RefCell<(u64, HashMap<String, Stream>)> = RefCell::new((0, HashMap::new()));
}

// A writing statement, so that it reads in a new snapshot: a long poll checks again after each
// sleep, and must see a revoke that committed during it. The function's body is planned into this
// statement (see its comment in sql/schema.sql).
static HAS_STREAM_PRIVILEGE: Statement = Statement {
    sql: "SELECT held FROM bussig.stream_privilege_of($1, $2, $3) AS held",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID, pg_sys::TEXTOID],
    writes: true,
};

static OWNS_STREAM: Statement = crate::access::owns_statement!("stream");

/// The stream named `name`, from this backend's cache when no drop or rename came since (its
/// `current_segment` may then be stale: appends read it in their own statement). A stream this
/// transaction created is not cached: the transaction may still roll back.
pub fn find(client: &mut SpiClient<'_>, name: &str) -> BusResult<Option<Stream>> {
    let generation = invalidation::generation(client)?;
    let cached = KNOWN.with(|known| {
        let known = known.borrow();
        (known.0 == generation)
            .then(|| known.1.get(name).copied())
            .flatten()
    });
    if cached.is_some() {
        return Ok(cached);
    }
    let Some(row) = plans::run(client, &FIND, &[name.into()])?.next() else {
        return Ok(None);
    };
    let found = Stream {
        stream_id: plans::filled(&row, 1, "stream id")?,
        partitions: plans::filled(&row, 2, "partition count")?,
        current_segment: plans::filled(&row, 3, "current segment")?,
    };
    let writer = plans::filled::<i64>(&row, 4, "xmin")? as u32;
    if !crate::pg::xact::is_this_transaction(writer) && invalidation::may_keep(generation) {
        KNOWN.with(|known| {
            let mut known = known.borrow_mut();
            if known.0 != generation || known.1.len() >= KNOWN_STREAMS_LIMIT {
                *known = (generation, HashMap::new());
            }
            known.1.insert(name.to_string(), found);
        });
    }
    Ok(Some(found))
}

/// The stream named `name` when the caller holds `privilege` on it: 42704 when there is none, 42501
/// when the caller lacks the privilege.
pub fn require(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    privilege: StreamPrivilege,
) -> BusResult<Stream> {
    if !caller.unrestricted() {
        let check = (On::Stream, &HAS_STREAM_PRIVILEGE);
        match caller.holds(client, check, name, Some(privilege.name()))? {
            Some(true) => {}
            Some(false) => return Err(denied(caller, privilege.name(), name)),
            None => return Err(BusError::UnknownStream(name.to_string())),
        }
    }
    find(client, name)?.ok_or_else(|| BusError::UnknownStream(name.to_string()))
}

/// Fails with 42501 unless the caller owns `stream` (or is unrestricted); 42704 for no such stream.
pub fn require_owner(client: &mut SpiClient<'_>, caller: &Caller, name: &str) -> BusResult<()> {
    if caller.unrestricted() {
        return Ok(());
    }
    let args = [caller.role().into(), name.into()];
    match plans::first_value::<bool>(client, &OWNS_STREAM, &args)? {
        None => Err(BusError::UnknownStream(name.to_string())),
        Some(true) => Ok(()),
        Some(false) => Err(denied(caller, "ownership", name)),
    }
}

pub fn denied(caller: &Caller, privilege: &'static str, stream: &str) -> BusError {
    BusError::StreamPermissionDenied {
        privilege,
        stream: stream.to_string(),
        role: identity::role_name(caller.role()),
    }
}

/// A stream or consumer group name: the queue-name rule, reported as a `what` name.
fn checked_name<'a>(name: Option<&'a str>, what: &'static str) -> BusResult<&'a str> {
    let name = validate::required(name, what)?;
    validate::queue_name(Some(name)).map_err(|error| match error {
        BusError::InvalidQueueName { why, .. } => BusError::InvalidName {
            what,
            name: name.to_string(),
            why,
        },
        other => other,
    })
}

pub fn stream_name(name: Option<&str>) -> BusResult<&str> {
    checked_name(name, "stream")
}

pub fn group_name(name: Option<&str>) -> BusResult<&str> {
    checked_name(name, "consumer_group")
}

/// A partition number given by the caller: 0 to partitions - 1 of the stream.
pub fn checked_partition(stream: &Stream, partition: i32) -> BusResult<i32> {
    if !(0..stream.partitions).contains(&partition) {
        return Err(BusError::invalid(
            "partition",
            format!(
                "{partition} is not between 0 and {} (the stream has {} partitions)",
                stream.partitions - 1,
                stream.partitions
            ),
        ));
    }
    Ok(partition)
}

/// The partition a key's records go to: FNV-1a of its bytes, so that the same key lands in the same
/// partition on every server and version.
pub fn partition_of_key(key: &str, partitions: i32) -> i32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % partitions.max(1) as u64) as i32
}

/// Where this backend's next record without a key goes: its partitions in turn, from a place of its
/// own, so that concurrent appenders spread over partitions.
pub fn partition_unkeyed(partitions: i32) -> i32 {
    use std::cell::Cell;
    thread_local! {
        static NEXT: Cell<u32> = Cell::new(crate::pg::my_pid() as u32);
    }
    let next = NEXT.with(|next| {
        let value = next.get();
        next.set(value.wrapping_add(1));
        value
    });
    (next % partitions.max(1) as u32) as i32
}

/// The key a stream's waiting readers are registered under in `wakeup`: queue ids are positive, so
/// a stream's is the negated stream id.
pub fn wake_key(stream_id: i32) -> i32 {
    -stream_id
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn a_key_always_lands_in_the_same_partition() {
        assert_eq!(
            partition_of_key("order-1", 8),
            partition_of_key("order-1", 8)
        );
        assert_eq!(partition_of_key("anything", 1), 0);
        let spread: std::collections::HashSet<i32> = (0..200)
            .map(|i| partition_of_key(&format!("k{i}"), 8))
            .collect();
        assert_eq!(spread.len(), 8);
    }
}
