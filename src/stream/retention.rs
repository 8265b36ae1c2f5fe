//! Retention, the worker's step (also run by `bussig.run_maintenance()`): each stream's segments are a
//! ring. Appends go to the current one; once it has taken appends for half the retention (or half the
//! size limit), the next, empty, segment takes over. A closed segment whose last append is older than
//! the retention, or the oldest while the stream is over its size limit, is emptied by TRUNCATE:
//! whole, never row by row, so a held snapshot keeps no dead records alive. Groups behind it read
//! from the oldest record kept.
use std::time::Duration;

use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use super::{sequence, Stream, SEGMENTS};
use crate::error::BusResult;
use crate::plans::{self, Statement};

// Streams no other transaction is rotating now.
static STREAMS: Statement = Statement {
    sql: "SELECT stream_id, partitions, current_segment, retention_bytes FROM bussig.stream
          ORDER BY stream_id FOR NO KEY UPDATE SKIP LOCKED",
    args: &[],
    writes: true,
};

// Each segment: its table, its size, whether it is past retention, and whether it has taken appends
// for long enough to close (half the retention: records live at most 1.5 retentions).
static SEGMENTS_OF: Statement = Statement {
    sql: "SELECT g.segment, pg_catalog.to_regclass(format('bussig.stream_%s_%s', s.stream_id, g.segment))::oid,
                 coalesce(pg_catalog.pg_total_relation_size(
                     pg_catalog.to_regclass(format('bussig.stream_%s_%s', s.stream_id, g.segment))), 0),
                 g.opened_at IS NULL,
                 coalesce(g.closed_at <= clock_timestamp() - s.retention, false),
                 g.closed_at IS NULL AND coalesce(g.opened_at <= clock_timestamp() - s.retention / 2, false),
                 g.closed_at IS NOT NULL
          FROM bussig.stream_segment g JOIN bussig.stream s USING (stream_id)
          WHERE g.stream_id = $1
          ORDER BY g.closed_at NULLS LAST, g.segment",
    args: &[pg_sys::INT4OID],
    writes: true,
};

static EMPTIED: Statement = Statement {
    sql: "UPDATE bussig.stream_segment SET opened_at = NULL, closed_at = NULL
          WHERE stream_id = $1 AND segment = $2",
    args: &[pg_sys::INT4OID, pg_sys::INT4OID],
    writes: true,
};

static ROTATE: Statement = Statement {
    sql: "WITH closed AS (
              UPDATE bussig.stream_segment SET closed_at = clock_timestamp()
              WHERE stream_id = $1 AND segment = $2),
          opened AS (
              UPDATE bussig.stream_segment SET opened_at = clock_timestamp(), closed_at = NULL
              WHERE stream_id = $1 AND segment = $3)
          UPDATE bussig.stream SET current_segment = $3 WHERE stream_id = $1",
    args: &[pg_sys::INT4OID, pg_sys::INT4OID, pg_sys::INT4OID],
    writes: true,
};

/// How long a due segment's step waits, in all, for partitions' rows that readers are numbering.
const PARTITION_WAIT: Duration = Duration::from_millis(200);

struct Segment {
    segment: i32,
    relation: pg_sys::Oid,
    bytes: i64,
    empty: bool,
    expired: bool,
    full_time: bool,
    closed: bool,
}

fn segments(client: &mut SpiClient<'_>, stream_id: i32) -> BusResult<Vec<Segment>> {
    plans::run(client, &SEGMENTS_OF, &[stream_id.into()])?
        .map(|row| {
            Ok(Segment {
                segment: plans::filled(&row, 1, "segment")?,
                relation: row.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                bytes: plans::filled(&row, 3, "segment size")?,
                empty: plans::filled(&row, 4, "empty flag")?,
                expired: plans::filled(&row, 5, "expiry flag")?,
                full_time: plans::filled(&row, 6, "age flag")?,
                closed: plans::filled(&row, 7, "closed flag")?,
            })
        })
        .collect()
}

/// Empties a closed segment: its records' seqs are past every partition's first seq from now on.
/// False, leaving it for a later round, while others use the table (an appender that has not
/// committed, a reader) past a short wait, or while it holds committed records not numbered yet.
fn empty_segment(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    segment: &Segment,
) -> BusResult<bool> {
    if segment.relation == pg_sys::InvalidOid
        || !crate::pg::locks::try_lock_exclusive(
            segment.relation,
            super::SEGMENT_LOCK_TRIES,
            super::SEGMENT_LOCK_PAUSE,
        )
    {
        return Ok(false);
    }
    let table = format!("{}_{}", stream.table(), segment.segment);
    // By partition, so that the index of unnumbered records answers.
    let unnumbered = format!(
        "SELECT EXISTS (SELECT FROM generate_series(0, {}) p
                        WHERE EXISTS (SELECT FROM {table} r WHERE r.partition = p AND r.seq IS NULL))",
        stream.partitions - 1
    );
    if plans::run_text(client, &unnumbered, &[], true, &[])?
        .next()
        .and_then(|row| row.get::<bool>(1).ok().flatten())
        .unwrap_or(true)
    {
        return Ok(false);
    }
    // Each partition's last seq in the segment, and its first in every other, one probe of the
    // numbered records' index each (the segment's table is locked for this: a scan of it would keep
    // every reader waiting). A record of the next segment may have a lower seq than the last one
    // here: one whose append read the current segment before the switch committed after records of
    // the next one were numbered. The first seq kept is the lower of the two.
    let probe = |table: &str, order: &str| {
        format!(
            "(SELECT r.seq FROM {table} r WHERE r.partition = q.partition AND r.seq IS NOT NULL
              ORDER BY r.seq {order} LIMIT 1)"
        )
    };
    let others: Vec<String> = (0..super::SEGMENTS)
        .filter(|&other| other != segment.segment)
        .map(|other| probe(&format!("{}_{other}", stream.table()), "ASC"))
        .collect();
    let move_first = format!(
        "UPDATE bussig.stream_partition p
         SET first_seq = greatest(p.first_seq, least(kept.last_seq + 1, kept.first_kept))
         FROM (SELECT q.partition, {} AS last_seq, least({}) AS first_kept
               FROM bussig.stream_partition q WHERE q.stream_id = $1) kept
         WHERE p.stream_id = $1 AND p.partition = kept.partition",
        probe(&table, "DESC"),
        others.join(", ")
    );
    plans::run_text(
        client,
        &move_first,
        &[pg_sys::INT4OID],
        true,
        &[stream.stream_id.into()],
    )?;
    client.update(format!("TRUNCATE {table}").as_str(), None, &[])?;
    plans::run(
        client,
        &EMPTIED,
        &[stream.stream_id.into(), segment.segment.into()],
    )?;
    Ok(true)
}

/// One stream's round: empty what retention lets go, then close the current segment when due.
fn rotate(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    retention_bytes: Option<i64>,
) -> BusResult<i64> {
    let mut segments = segments(client, stream.stream_id)?;
    let mut total: i64 = segments.iter().map(|segment| segment.bytes).sum();
    // Oldest closed first.
    let closed: Vec<usize> = (0..segments.len())
        .filter(|&i| segments[i].closed && !segments[i].empty)
        .collect();
    let over = |total: i64| retention_bytes.is_some_and(|limit| total > limit);
    let due = closed
        .first()
        .is_some_and(|&i| segments[i].expired || over(total));
    // Only when a segment is due: records committed in it get their numbers before it may go, and
    // the partitions' row locks are taken before any segment's table lock, as readers take them (a
    // reader numbering a partition would wait for the segment while this waits for its row). Not on
    // every round: numbering here would hold every partition's row to the end of the step, and
    // readers skip a partition whose row is held.
    let numbered_all = due && sequence::number_all_waiting(client, stream, PARTITION_WAIT)?;
    let mut emptied = 0;
    for i in closed {
        if !(segments[i].expired || over(total)) || !numbered_all {
            break;
        }
        if !empty_segment(client, stream, &segments[i])? {
            break;
        }
        total -= segments[i].bytes;
        segments[i].empty = true;
        emptied += 1;
    }
    let at = |number: i32| segments.iter().find(|segment| segment.segment == number);
    let next = (stream.current_segment + 1) % SEGMENTS;
    let (Some(current), Some(following)) = (at(stream.current_segment), at(next)) else {
        return Ok(emptied);
    };
    let full_size = retention_bytes.is_some_and(|limit| current.bytes * 2 >= limit);
    if (current.full_time || full_size) && following.empty {
        let args = [
            stream.stream_id.into(),
            stream.current_segment.into(),
            next.into(),
        ];
        plans::run(client, &ROTATE, &args)?;
    }
    Ok(emptied)
}

/// Every stream's round: how many segments were emptied. None in a caller's REPEATABLE READ
/// transaction: the look for unnumbered records after a segment's lock needs a snapshot taken after
/// it, or a record committed meanwhile would go with the segment.
pub fn rotate_all(client: &mut SpiClient<'_>) -> BusResult<i64> {
    if crate::pg::xact::snapshot_is_fixed() {
        return Ok(0);
    }
    let mut streams = Vec::new();
    for row in plans::run(client, &STREAMS, &[])? {
        streams.push((
            Stream {
                stream_id: plans::filled(&row, 1, "stream id")?,
                partitions: plans::filled(&row, 2, "partition count")?,
                current_segment: plans::filled(&row, 3, "current segment")?,
            },
            row.get::<i64>(4)?,
        ));
    }
    let mut emptied = 0;
    for (stream, retention_bytes) in streams {
        emptied += rotate(client, &stream, retention_bytes)?;
    }
    Ok(emptied)
}
