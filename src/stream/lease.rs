//! Leases of a consumer group's partitions: one member reads a partition at a time. A lease is a row
//! of the unlogged bussig.group_lease (see docs/design.md, "Streams"): taking, extending and ending
//! one writes no WAL. stream_commit ends a lease in the same statement that moves the position
//! (`read::commit`); every statement that takes both rows takes the lease row first.
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use pgrx::Uuid;

use super::group::require_group;
use super::read::StreamReadRequest;
use super::{checked_partition, require, Stream, StreamPrivilege};
use crate::access::Caller;
use crate::error::BusResult;
use crate::plans::{self, Statement};
use crate::validate;

// Leases the next partition of the group with records past the group's position and no lease in
// force, counting from partition $3 and passing over those tried ($6), unless another member is
// taking it right now (SKIP LOCKED). The lease is a row of the unlogged bussig.group_lease: a read
// with nothing new to number writes no WAL (a look for records to number locks the partition's
// row). The candidate is leased by its key, with the condition asked again: a member that took or
// ended the lease after this statement's snapshot has made a newer version, which the update finds
// and checks. Returns the candidate, and the token when leased.
static LEASE_NEXT: Statement = Statement {
    sql: "WITH candidate AS (
              SELECT l.partition
              FROM bussig.group_lease l
              JOIN bussig.group_partition g USING (stream_id, consumer_group, partition)
              JOIN bussig.stream_partition p USING (stream_id, partition)
              WHERE l.stream_id = $1 AND l.consumer_group = $2 AND NOT l.partition = ANY ($6)
                AND (l.leased_until IS NULL OR l.leased_until <= clock_timestamp())
                AND p.head_seq > greatest(g.committed_seq, p.first_seq - 1)
              ORDER BY (l.partition - $3 + $4) % $4
              LIMIT 1
              FOR UPDATE OF l SKIP LOCKED),
          leased AS (
              UPDATE bussig.group_lease l
              SET lease_token = gen_random_uuid(), leased_until = clock_timestamp() + $5
              FROM candidate
              WHERE l.stream_id = $1 AND l.consumer_group = $2 AND l.partition = candidate.partition
                AND (l.leased_until IS NULL OR l.leased_until <= clock_timestamp())
              RETURNING l.partition, l.lease_token)
          SELECT c.partition, leased.lease_token FROM candidate c LEFT JOIN leased USING (partition)",
    args: &[
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::INT4OID,
        pg_sys::INT4OID,
        pg_sys::INTERVALOID,
        pg_sys::INT4ARRAYOID,
    ],
    writes: true,
};

// Ends the leases of the group's partition $3, or of all its partitions when $3 is NULL; with $4, only
// the lease of that token. Without a token every row named is written, a free one too: the update
// waits for a member taking the lease right now, ends what it took, and holds the rows to the end of
// the transaction, so that no member leases them meanwhile (a seek's position then holds).
static END_LEASES: Statement = Statement {
    sql: "UPDATE bussig.group_lease SET lease_token = NULL, leased_until = NULL
          WHERE stream_id = $1 AND consumer_group = $2 AND (partition = $3 OR $3 IS NULL)
            AND (lease_token = $4 OR $4 IS NULL)
          RETURNING true",
    args: &[
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::INT4OID,
        pg_sys::UUIDOID,
    ],
    writes: true,
};

static NEXT_LEASE_END: Statement = Statement {
    sql: "SELECT extract(epoch FROM min(leased_until) - clock_timestamp())::float8
          FROM bussig.group_lease
          WHERE stream_id = $1 AND consumer_group = $2 AND leased_until > clock_timestamp()",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

// A lease still the caller's runs until $5 from now; a lease another member took since matches no row.
static EXTEND: Statement = Statement {
    sql: "UPDATE bussig.group_lease SET leased_until = clock_timestamp() + $5
          WHERE stream_id = $1 AND consumer_group = $2 AND partition = $3 AND lease_token = $4
          RETURNING true",
    args: &[
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::INT4OID,
        pg_sys::UUIDOID,
        pg_sys::INTERVALOID,
    ],
    writes: true,
};

/// The next partition `LEASE_NEXT` found, and the lease's token when it took the lease (None when a
/// member took it since the statement's snapshot).
pub fn next(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    group: &str,
    start: i32,
    request: &StreamReadRequest,
    tried: &[i32],
) -> BusResult<Option<(i32, Option<Uuid>)>> {
    let args = [
        stream.stream_id.into(),
        group.into(),
        start.into(),
        stream.partitions.into(),
        request.lease.into(),
        tried.to_vec().into(),
    ];
    let Some(row) = plans::run(client, &LEASE_NEXT, &args)?.next() else {
        return Ok(None);
    };
    let partition: i32 = plans::filled(&row, 1, "partition")?;
    Ok(Some((partition, row.get::<Uuid>(2)?)))
}

/// Seconds until the group's next lease in force ends; None when none is.
pub fn seconds_to_next_end(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    group: &str,
) -> BusResult<Option<f64>> {
    let args = [stream.stream_id.into(), group.into()];
    Ok(plans::first_value::<f64>(client, &NEXT_LEASE_END, &args)?)
}

/// The arguments that name a group's partition (all of them when None), as statements take them first.
pub fn partition_of_group<'a>(
    stream: &Stream,
    group: &'a str,
    partition: Option<i32>,
) -> [DatumWithOid<'a>; 3] {
    [stream.stream_id.into(), group.into(), partition.into()]
}

/// Ends the leases of the group's partition, or of all its partitions; with a token, only that lease
/// (and whether it was still in place).
pub fn end(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    group: &str,
    partition: Option<i32>,
    token: Option<Uuid>,
) -> BusResult<bool> {
    let [stream_id, group, partition] = partition_of_group(stream, group, partition);
    let args = [stream_id, group, partition, token.into()];
    Ok(!plans::run(client, &END_LEASES, &args)?.is_empty())
}

/// A partition of a group's stream as a caller names it, its arguments checked.
#[derive(Clone, Copy)]
pub struct GroupPartition<'a> {
    pub stream: &'a str,
    pub group: &'a str,
    pub partition: i32,
}

impl<'a> GroupPartition<'a> {
    pub fn check(
        stream: Option<&'a str>,
        group: Option<&'a str>,
        partition: Option<i32>,
    ) -> BusResult<Self> {
        Ok(GroupPartition {
            stream: super::stream_name(stream)?,
            group: super::group_name(group)?,
            partition: validate::required(partition, "partition")?,
        })
    }

    /// The stream, which the caller may read and which has this partition.
    pub fn stream(&self, client: &mut SpiClient<'_>, caller: &Caller) -> BusResult<Stream> {
        let stream = require(client, caller, self.stream, StreamPrivilege::Read)?;
        checked_partition(&stream, self.partition)?;
        Ok(stream)
    }
}

/// A lease a member holds: the partition, and the token stream_read gave for it.
pub struct HeldLease<'a> {
    pub place: GroupPartition<'a>,
    pub token: Uuid,
}

impl<'a> HeldLease<'a> {
    pub fn check(place: GroupPartition<'a>, token: Option<Uuid>) -> BusResult<Self> {
        Ok(HeldLease {
            place,
            token: validate::required(token, "lease_token")?,
        })
    }

    /// Whether the lease is still this token's, or was: false, once checked that the group exists.
    fn still_held(
        &self,
        client: &mut SpiClient<'_>,
        stream: &Stream,
        applied: bool,
    ) -> BusResult<bool> {
        if !applied {
            require_group(client, self.place.stream, stream, self.place.group)?;
        }
        Ok(applied)
    }
}

/// stream_extend_lease: the lease runs `lease` from now; false when another member took it since.
pub fn extend(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    held: &HeldLease<'_>,
    lease: pgrx::datum::Interval,
) -> BusResult<bool> {
    let (place, stream) = (held.place, held.place.stream(client, caller)?);
    let [stream_id, group, partition] =
        partition_of_group(&stream, place.group, Some(place.partition));
    let args = [stream_id, group, partition, held.token.into(), lease.into()];
    let applied = plans::first_value::<bool>(client, &EXTEND, &args)?.is_some();
    held.still_held(client, &stream, applied)
}

/// stream_release: ends the lease without moving the group's position, so that the records are read
/// again, by any member, at once; false when another member took it since. Waiting readers are woken.
pub fn release(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    held: &HeldLease<'_>,
) -> BusResult<bool> {
    let (place, stream) = (held.place, held.place.stream(client, caller)?);
    let applied = end(
        client,
        &stream,
        place.group,
        Some(place.partition),
        Some(held.token),
    )?;
    if applied {
        crate::pg::wakeup::note_readable(super::wake_key(stream.stream_id), u32::MAX);
    }
    held.still_held(client, &stream, applied)
}
