//! stream_read (leases, the long poll), stream_commit, stream_seek, stream_seek_time and
//! stream_range. A group's member leases each partition it returns records from: one member per
//! partition at a time, so a key's records are processed in order across members, lease expiry and
//! crashes.
use std::time::{Duration, Instant};

use pgrx::datum::{DatumWithOid, Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::spi::{SpiClient, SpiHeapTupleData};
use pgrx::Uuid;

use super::body::{self, Body};
use super::group::{make_sure_of_leases, require_group};
use super::lease::GroupPartition;
use super::{checked_partition, lease, require, sequence, Stream, StreamPrivilege};
use crate::access::{self, Caller};
use crate::error::{BusError, BusResult};
use crate::pg::datum::Jsonb;
use crate::pg::{arrivals, wakeup};
use crate::plans::{self, Statement};
use crate::validate;

/// One record as stream_read and stream_range return it (stream_range without a lease token).
pub struct StreamRecord {
    pub partition: i32,
    pub seq: i64,
    pub lease_token: Option<Uuid>,
    pub subject: Option<String>,
    pub key: Option<String>,
    pub payload: Jsonb,
    pub headers: Option<Jsonb>,
    pub appended_at: TimestampWithTimeZone,
}

// Ends the lease when the token is still the one handed out (an expired lease nobody took since
// still commits) and moves the position: never back, nor past the head. A stale token matches no row.
static COMMIT: Statement = Statement {
    sql: "WITH ended AS (
              UPDATE bussig.group_lease SET lease_token = NULL, leased_until = NULL
              WHERE stream_id = $1 AND consumer_group = $2 AND partition = $3 AND lease_token = $5
              RETURNING stream_id, consumer_group, partition)
          UPDATE bussig.group_partition g
          SET committed_seq = greatest(g.committed_seq, least($4, p.head_seq))
          FROM ended, bussig.stream_partition p
          WHERE g.stream_id = ended.stream_id AND g.consumer_group = ended.consumer_group
            AND g.partition = ended.partition
            AND p.stream_id = g.stream_id AND p.partition = g.partition
          RETURNING true",
    args: &[
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::INT4OID,
        pg_sys::INT8OID,
        pg_sys::UUIDOID,
    ],
    writes: true,
};

// Moves the position, never past the partition's next record; the lease was ended before, as a
// commit ends it: the lease row first, then the position's, in every statement that takes both.
static SEEK: Statement = Statement {
    sql: "UPDATE bussig.group_partition g SET committed_seq = $4 - 1
          FROM bussig.stream_partition p
          WHERE g.stream_id = $1 AND g.consumer_group = $2 AND g.partition = $3
            AND p.stream_id = g.stream_id AND p.partition = g.partition AND $4 - 1 <= p.head_seq
          RETURNING true",
    args: &[
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::INT4OID,
        pg_sys::INT8OID,
    ],
    writes: true,
};

/// Records of a partition in order: after the group's position ($3, $4) when a group is named, else
/// after $2. The position is read in this statement, after the lease was taken in the one before,
/// so a commit that ended the previous lease just before is seen. A writing statement: it sees what
/// this call and others numbered a moment ago. The limit is written in (see `plans::run_limited`).
/// A record without a payload of its own names the shared body that holds it (`body`), and shows a
/// JSON null in its place until that is read.
fn records_after(stream: &Stream, limit: i32) -> String {
    format!(
        "SELECT seq, subject, key, coalesce(payload, 'null'), headers, appended_at, body_segment, body_id
         FROM {}
         WHERE partition = $1
           AND seq > coalesce((SELECT greatest(g.committed_seq, p.first_seq - 1)
                               FROM bussig.group_partition g JOIN bussig.stream_partition p USING (stream_id, partition)
                               WHERE g.stream_id = $3 AND g.consumer_group = $4 AND g.partition = $1), $2)
         ORDER BY seq LIMIT {limit}",
        stream.table()
    )
}

// Each group partition to the first record appended at or after $3, or past the head when none is.
fn seek_time(stream: &Stream) -> String {
    format!(
        "UPDATE bussig.group_partition g
         SET committed_seq = coalesce((SELECT min(r.seq) FROM {} r
                                       WHERE r.partition = g.partition AND r.seq IS NOT NULL AND r.appended_at >= $3),
                                      p.head_seq + 1) - 1
         FROM bussig.stream_partition p
         WHERE g.stream_id = $1 AND g.consumer_group = $2 AND p.stream_id = g.stream_id AND p.partition = g.partition",
        stream.table()
    )
}

/// A record read, and the shared body that holds its payload when it has none of its own.
struct Read {
    record: StreamRecord,
    body: Option<Body>,
}

fn decode(
    row: &SpiHeapTupleData<'_>,
    partition: i32,
    lease_token: Option<Uuid>,
) -> BusResult<Read> {
    let body = match row.get::<i64>(8)? {
        Some(body_id) => Some(Body {
            segment: plans::filled(row, 7, "body segment")?,
            body_id,
        }),
        None => None,
    };
    let record = StreamRecord {
        partition,
        seq: plans::filled(row, 1, "seq")?,
        lease_token,
        subject: row.get(2)?,
        key: row.get(3)?,
        payload: plans::filled(row, 4, "payload")?,
        headers: row.get(5)?,
        appended_at: plans::filled(row, 6, "append time")?,
    };
    Ok(Read { record, body })
}

/// Where a read starts in a partition: after a seq, or after a group's position.
enum From<'a> {
    Seq(i64),
    Group(i32, &'a str),
}

/// Up to `wanted` records of `partition` after `from`, by the statement for `limit` (the call's
/// max_records: one kept statement however many a pass still wants).
fn read_partition(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    partition: i32,
    from: From<'_>,
    (wanted, limit): (i64, i32),
    lease_token: Option<Uuid>,
) -> BusResult<Vec<StreamRecord>> {
    let types = [
        pg_sys::INT4OID,
        pg_sys::INT8OID,
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
    ];
    let (after, stream_id, group) = match from {
        From::Seq(after) => (Some(after), None, None),
        From::Group(stream_id, group) => (None, Some(stream_id), Some(group)),
    };
    let args = [
        partition.into(),
        after.into(),
        stream_id.into(),
        group.into(),
    ];
    let sql = records_after(stream, limit);
    let read: Vec<Read> =
        plans::run_text_stopping(client, &sql, &types, true, &args, Some(wanted))?
            .map(|row| decode(&row, partition, lease_token))
            .collect::<BusResult<_>>()?;
    let mut records = Vec::with_capacity(read.len());
    for Read { mut record, body } in read {
        if let Some(body) = body {
            record.payload = body::payload(client, body).map_err(|error| match error {
                BusError::Corrupt(what) => BusError::Corrupt(format!(
                    "record {} of partition {partition} of stream {}: {what}",
                    record.seq, stream.stream_id
                )),
                other => other,
            })?;
        }
        records.push(record);
    }
    Ok(records)
}

/// The checked arguments of stream_read.
pub struct StreamReadRequest {
    pub max_records: i32,
    pub wait: Duration,
    pub lease: Interval,
}

impl StreamReadRequest {
    pub fn check(
        max_records: Option<i32>,
        wait: Option<Interval>,
        lease: Option<Interval>,
    ) -> BusResult<Self> {
        let max_records = checked_max_records(max_records)?;
        let wait = match wait {
            Some(wait) => {
                validate::not_negative(&wait, "wait")?;
                Duration::from_micros(wait.as_micros().clamp(0, u64::MAX as i128) as u64)
            }
            None => Duration::ZERO,
        };
        let lease = Self::checked_lease(lease)?;
        Ok(StreamReadRequest {
            max_records,
            wait,
            lease,
        })
    }

    /// A lease's length: given, and more than zero.
    pub fn checked_lease(lease: Option<Interval>) -> BusResult<Interval> {
        let lease = validate::required(lease, "lease")?;
        validate::positive(&lease, "lease")?;
        Ok(lease)
    }
}

pub fn checked_max_records(max_records: Option<i32>) -> BusResult<i32> {
    let max_records = validate::required(max_records, "max_records")?;
    if !(1..=validate::MAX_BATCH).contains(&max_records) {
        return Err(BusError::invalid(
            "max_records",
            format!("{max_records} is not between 1 and {}", validate::MAX_BATCH),
        ));
    }
    Ok(max_records)
}

/// One pass over the group's partitions with records and no lease in force, from a place that
/// differs between calls, so that members spread over partitions: one statement leases a partition,
/// one reads it.
fn read_once(
    client: &mut SpiClient<'_>,
    name: &str,
    stream: &Stream,
    group: &str,
    request: &StreamReadRequest,
) -> BusResult<Vec<StreamRecord>> {
    for partition in 0..stream.partitions {
        sequence::number_new(client, stream, partition)?;
    }
    make_sure_of_leases(client, stream, group)?;
    let start = super::partition_unkeyed(stream.partitions);
    let mut records = Vec::new();
    let mut left = i64::from(request.max_records);
    let mut tried: Vec<i32> = Vec::new();
    while left > 0 {
        let Some((partition, token)) = lease::next(client, stream, group, start, request, &tried)?
        else {
            break;
        };
        tried.push(partition);
        // Another member leased it since this statement's snapshot.
        let Some(token) = token else {
            continue;
        };
        let from = From::Group(stream.stream_id, group);
        let limits = (left, request.max_records);
        let found = read_partition(client, stream, partition, from, limits, Some(token))?;
        if found.is_empty() {
            // A commit moved the position to the head between the two statements.
            lease::end(client, stream, group, Some(partition), Some(token))?;
            continue;
        }
        left -= found.len() as i64;
        records.extend(found);
    }
    if records.is_empty() {
        require_group(client, name, stream, group)?;
    }
    Ok(records)
}

/// stream_read: the group's next records; with a wait, sleeps until an append commits, a lease of
/// the group runs out, or the wait is over, and reads again.
pub fn read_waiting(
    name: &str,
    group: &str,
    request: StreamReadRequest,
) -> BusResult<Vec<StreamRecord>> {
    let started = Instant::now();
    let mut waiting: Option<wakeup::Waiting> = None;
    loop {
        let (records, key, read_from, may_wait, lease_ends) = access::connect(|client, caller| {
            let stream = require(client, caller, name, StreamPrivilege::Read)?;
            let key = super::wake_key(stream.stream_id);
            // Noted before the read's snapshots are taken: see `arrivals`.
            let read_from = arrivals::seen(key);
            let records = if request.wait > Duration::ZERO && !crate::pg::xact::snapshot_is_fixed()
            {
                // A read that may sleep next lets go of the rows it locked (a candidate whose lease a
                // member took meanwhile stays locked until the transaction ends) when it found nothing.
                crate::pg::xact::in_subtransaction(
                    || read_once(client, name, &stream, group, &request),
                    |records| !records.is_empty(),
                )?
            } else {
                read_once(client, name, &stream, group, &request)?
            };
            let may_wait =
                started.elapsed() < request.wait && !crate::pg::xact::snapshot_is_fixed();
            let lease_ends = if records.is_empty() && may_wait {
                lease::seconds_to_next_end(client, &stream, group)?
            } else {
                None
            };
            Ok((records, key, read_from, may_wait, lease_ends))
        })?;
        let deadline = started + request.wait;
        let now = Instant::now();
        if !records.is_empty() || !may_wait || now >= deadline {
            if let Some(waiting) = waiting.take() {
                waiting.done(records.len() == request.max_records as usize, read_from);
            }
            return Ok(records);
        }
        let read_again = match &waiting {
            Some(waiting) => waiting.rearm(read_from),
            None => {
                let wants = u32::try_from(request.max_records).unwrap_or(1);
                let (registered, moved) = wakeup::Waiting::register(key, wants, read_from);
                waiting = Some(registered);
                moved
            }
        };
        if read_again {
            continue;
        }
        let until_lease_ends = lease_ends.map_or(Duration::MAX, |seconds| {
            Duration::from_secs_f64(seconds.max(0.0))
        });
        if let Some(waiting) = &waiting {
            waiting.sleep((deadline - now).min(until_lease_ends));
        }
    }
}

/// A place in a partition a group moves to (stream_commit, stream_seek), its arguments checked.
pub struct GroupPosition<'a> {
    pub place: GroupPartition<'a>,
    pub seq: i64,
}

impl<'a> GroupPosition<'a> {
    pub fn check(place: GroupPartition<'a>, seq: Option<i64>) -> BusResult<Self> {
        Ok(GroupPosition {
            place,
            seq: checked_seq(validate::required(seq, "seq")?, "seq")?,
        })
    }

    /// The stream, which the caller may read and whose partition this is, and the arguments that
    /// name the group's partition, with the seq.
    fn resolve(
        &self,
        client: &mut SpiClient<'_>,
        caller: &Caller,
    ) -> BusResult<(Stream, [DatumWithOid<'a>; 4])> {
        let place = self.place;
        let stream = place.stream(client, caller)?;
        let [stream_id, group, partition] =
            lease::partition_of_group(&stream, place.group, Some(place.partition));
        Ok((stream, [stream_id, group, partition, self.seq.into()]))
    }
}

/// stream_commit: true when the lease was still the caller's.
pub fn commit(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    at: &GroupPosition<'_>,
    lease_token: Uuid,
) -> BusResult<bool> {
    let (stream, [stream_id, group, partition, seq]) = at.resolve(client, caller)?;
    let args = [stream_id, group, partition, seq, lease_token.into()];
    // A lost position only makes the group read the records again.
    let committed = crate::pg::xact::replayable_write(|| {
        Ok(plans::first_value::<bool>(client, &COMMIT, &args)?.is_some())
    })?;
    if committed {
        return Ok(true);
    }
    require_group(client, at.place.stream, &stream, at.place.group)?;
    Ok(false)
}

fn checked_seq(seq: i64, what: &'static str) -> BusResult<i64> {
    if seq < 1 {
        return Err(BusError::invalid(
            what,
            format!("{seq} is not a seq: they start at 1"),
        ));
    }
    Ok(seq)
}

/// stream_seek: the group's next read of `partition` starts at `seq`; a lease in force ends. A seq
/// past the partition's next record is refused (22023): the group would pass over records not yet
/// appended.
pub fn seek(client: &mut SpiClient<'_>, caller: &Caller, at: &GroupPosition<'_>) -> BusResult<()> {
    let (stream, args) = at.resolve(client, caller)?;
    let place = at.place;
    require_group(client, place.stream, &stream, place.group)?;
    sequence::number_new(client, &stream, place.partition)?;
    lease::end(client, &stream, place.group, Some(place.partition), None)?;
    if plans::run(client, &SEEK, &args)?.is_empty() {
        return Err(BusError::invalid(
            "seq",
            format!(
                "{} is past the next record of partition {} (its head_seq + 1 in bussig.consumer_groups)",
                at.seq, place.partition
            ),
        ));
    }
    Ok(())
}

/// stream_seek_time: every partition of the group to its first record appended at or after `at`;
/// leases in force end.
pub fn seek_to_time(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    group: &str,
    at: TimestampWithTimeZone,
) -> BusResult<()> {
    let stream = require(client, caller, name, StreamPrivilege::Read)?;
    require_group(client, name, &stream, group)?;
    sequence::number_all(client, &stream)?;
    lease::end(client, &stream, group, None, None)?;
    let types = [pg_sys::INT4OID, pg_sys::TEXTOID, pg_sys::TIMESTAMPTZOID];
    let args = [stream.stream_id.into(), group.into(), at.into()];
    plans::run_text(client, &seek_time(&stream), &types, true, &args)?;
    Ok(())
}

/// stream_range: up to `max_records` records of `partition` from `from_seq` on, without a group.
pub fn range(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    partition: i32,
    from_seq: i64,
    max_records: i32,
) -> BusResult<Vec<StreamRecord>> {
    checked_seq(from_seq, "from_seq")?;
    let stream = require(client, caller, name, StreamPrivilege::Read)?;
    checked_partition(&stream, partition)?;
    sequence::number_new(client, &stream, partition)?;
    read_partition(
        client,
        &stream,
        partition,
        From::Seq(from_seq - 1),
        (i64::from(max_records), max_records),
        None,
    )
}
