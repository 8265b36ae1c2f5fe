//! stream_read (leases, the long poll), stream_commit, stream_seek, stream_seek_time and
//! stream_range. A group's member leases each partition it returns records from: one member per
//! partition at a time, so a key's records are processed in order across members, lease expiry and
//! crashes.
use std::time::{Duration, Instant};

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::spi::{SpiClient, SpiHeapTupleData};
use pgrx::Uuid;

use super::group::require_group;
use super::{checked_partition, require, sequence, Stream, StreamPrivilege};
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

// Partitions of the group on which no lease is in force, where it is, and how far it may read.
static FREE_PARTITIONS: Statement = Statement {
    sql: "SELECT g.partition, greatest(g.committed_seq, p.first_seq - 1), p.head_seq
          FROM bussig.group_partition g JOIN bussig.stream_partition p USING (stream_id, partition)
          WHERE g.stream_id = $1 AND g.consumer_group = $2
            AND (g.leased_until IS NULL OR g.leased_until <= clock_timestamp())
          ORDER BY g.partition",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

// Takes the lease unless another member holds it or is taking it right now.
static LEASE: Statement = Statement {
    sql: "WITH free AS (
              SELECT ctid FROM bussig.group_partition
              WHERE stream_id = $1 AND consumer_group = $2 AND partition = $3
                AND (leased_until IS NULL OR leased_until <= clock_timestamp())
              FOR UPDATE SKIP LOCKED)
          UPDATE bussig.group_partition g
          SET lease_token = gen_random_uuid(), leased_until = clock_timestamp() + $4
          FROM free WHERE g.ctid = free.ctid
          RETURNING g.committed_seq, g.lease_token",
    args: &[
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::INT4OID,
        pg_sys::INTERVALOID,
    ],
    writes: true,
};

static RELEASE: Statement = Statement {
    sql: "UPDATE bussig.group_partition SET lease_token = NULL, leased_until = NULL
          WHERE stream_id = $1 AND consumer_group = $2 AND partition = $3 AND lease_token = $4",
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
          FROM bussig.group_partition
          WHERE stream_id = $1 AND consumer_group = $2 AND leased_until > clock_timestamp()",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

// A stale token matches no row: false. The position never moves back, nor past the head.
static COMMIT: Statement = Statement {
    sql: "UPDATE bussig.group_partition g
          SET committed_seq = greatest(g.committed_seq, least($4, p.head_seq)), lease_token = NULL, leased_until = NULL
          FROM bussig.stream_partition p
          WHERE g.stream_id = $1 AND g.consumer_group = $2 AND g.partition = $3 AND g.lease_token = $5
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

static SEEK: Statement = Statement {
    sql: "UPDATE bussig.group_partition SET committed_seq = $4 - 1, lease_token = NULL, leased_until = NULL
          WHERE stream_id = $1 AND consumer_group = $2 AND partition = $3",
    args: &[
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::INT4OID,
        pg_sys::INT8OID,
    ],
    writes: true,
};

/// Records of a partition after a seq, in order. A writing statement: it sees what this call and
/// others numbered a moment ago.
fn records_after(stream: &Stream) -> String {
    format!(
        "SELECT seq, subject, key, payload, headers, appended_at FROM {}
         WHERE partition = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        stream.table()
    )
}

// Each group partition to the first record appended at or after $3, or past the head when none is.
fn seek_time(stream: &Stream) -> String {
    format!(
        "UPDATE bussig.group_partition g
         SET committed_seq = coalesce((SELECT min(r.seq) FROM {} r
                                       WHERE r.partition = g.partition AND r.seq IS NOT NULL AND r.appended_at >= $3),
                                      p.head_seq + 1) - 1,
             lease_token = NULL, leased_until = NULL
         FROM bussig.stream_partition p
         WHERE g.stream_id = $1 AND g.consumer_group = $2 AND p.stream_id = g.stream_id AND p.partition = g.partition",
        stream.table()
    )
}

fn decode(
    row: &SpiHeapTupleData<'_>,
    partition: i32,
    lease_token: Option<Uuid>,
) -> BusResult<StreamRecord> {
    Ok(StreamRecord {
        partition,
        seq: plans::filled(row, 1, "seq")?,
        lease_token,
        subject: row.get(2)?,
        key: row.get(3)?,
        payload: plans::filled(row, 4, "payload")?,
        headers: row.get(5)?,
        appended_at: plans::filled(row, 6, "append time")?,
    })
}

/// Up to `limit` records of `partition` after `after`.
fn read_partition(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    partition: i32,
    after: i64,
    limit: i64,
    lease_token: Option<Uuid>,
) -> BusResult<Vec<StreamRecord>> {
    let types = [pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::INT8OID];
    let args = [partition.into(), after.into(), limit.into()];
    plans::run_text(client, &records_after(stream), &types, true, &args)?
        .map(|row| decode(&row, partition, lease_token))
        .collect()
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
        let lease = validate::required(lease, "lease")?;
        validate::positive(&lease, "lease")?;
        Ok(StreamReadRequest {
            max_records,
            wait,
            lease,
        })
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

/// One pass over the group's free partitions, from a place that differs between calls, so that
/// members spread over partitions.
fn read_once(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    group: &str,
    request: &StreamReadRequest,
) -> BusResult<Vec<StreamRecord>> {
    let args = [stream.stream_id.into(), group.into()];
    let mut free: Vec<(i32, i64, i64)> = Vec::new();
    for row in plans::run(client, &FREE_PARTITIONS, &args)? {
        free.push((
            plans::filled(&row, 1, "partition")?,
            plans::filled(&row, 2, "committed seq")?,
            plans::filled(&row, 3, "head seq")?,
        ));
    }
    if free.len() > 1 {
        let start = super::partition_unkeyed(free.len() as i32) as usize;
        free.rotate_left(start);
    }
    let mut records = Vec::new();
    let mut left = i64::from(request.max_records);
    for (partition, committed, head) in free {
        if left == 0 {
            break;
        }
        let head = match sequence::number(client, stream, partition)? {
            Some(head) => head,
            None => head,
        };
        if head <= committed {
            continue;
        }
        let args = [
            stream.stream_id.into(),
            group.into(),
            partition.into(),
            request.lease.into(),
        ];
        let Some(row) = plans::run(client, &LEASE, &args)?.next() else {
            continue;
        };
        let committed = committed.max(plans::filled(&row, 1, "committed seq")?);
        let token: Uuid = plans::filled(&row, 2, "lease token")?;
        let found = read_partition(client, stream, partition, committed, left, Some(token))?;
        if found.is_empty() {
            let args = [
                stream.stream_id.into(),
                group.into(),
                partition.into(),
                token.into(),
            ];
            plans::run(client, &RELEASE, &args)?;
            continue;
        }
        left -= found.len() as i64;
        records.extend(found);
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
            require_group(client, name, &stream, group)?;
            let key = super::wake_key(stream.stream_id);
            // Noted before the read's snapshots are taken: see `arrivals`.
            let read_from = arrivals::seen(key);
            let records = read_once(client, &stream, group, &request)?;
            let may_wait =
                started.elapsed() < request.wait && !crate::pg::xact::snapshot_is_fixed();
            let lease_ends = if records.is_empty() && may_wait {
                let args = [stream.stream_id.into(), group.into()];
                plans::first_value::<f64>(client, &NEXT_LEASE_END, &args)?
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

/// stream_commit: true when the lease was still the caller's.
pub fn commit(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    group: &str,
    partition: i32,
    seq: i64,
    lease_token: Uuid,
) -> BusResult<bool> {
    let stream = group_position(client, caller, name, group, partition, seq)?;
    let args = [
        stream.stream_id.into(),
        group.into(),
        partition.into(),
        seq.into(),
        lease_token.into(),
    ];
    Ok(plans::first_value::<bool>(client, &COMMIT, &args)?.unwrap_or(false))
}

/// The stream whose group `group` moves in `partition` to `seq` (commit, seek), all checked: the
/// caller may read the stream, the group exists, the partition and the seq are valid.
fn group_position(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    group: &str,
    partition: i32,
    seq: i64,
) -> BusResult<Stream> {
    let stream = require(client, caller, name, StreamPrivilege::Read)?;
    require_group(client, name, &stream, group)?;
    checked_partition(&stream, partition)?;
    checked_seq(seq, "seq")?;
    Ok(stream)
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

/// stream_seek: the group's next read of `partition` starts at `seq`; a lease in force ends.
pub fn seek(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    group: &str,
    partition: i32,
    seq: i64,
) -> BusResult<()> {
    let stream = group_position(client, caller, name, group, partition, seq)?;
    let args = [
        stream.stream_id.into(),
        group.into(),
        partition.into(),
        seq.into(),
    ];
    plans::run(client, &SEEK, &args)?;
    Ok(())
}

/// stream_seek_time: every partition of the group to its first record appended at or after `at`.
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
    let stream = require(client, caller, name, StreamPrivilege::Read)?;
    checked_partition(&stream, partition)?;
    checked_seq(from_seq, "from_seq")?;
    sequence::number(client, &stream, partition)?;
    read_partition(
        client,
        &stream,
        partition,
        from_seq - 1,
        i64::from(max_records),
        None,
    )
}
