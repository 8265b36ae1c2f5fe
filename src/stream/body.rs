//! Bodies of records `publish` appends to several streams: the payload is stored once, in
//! bussig.stream_body, and each record refers to it by (body_segment, body_id). The bodies are a ring
//! of segments as a stream's records are: new bodies go to the current one, and a segment that no kept
//! record of any stream refers to is emptied whole by TRUNCATE, never row by row. The current segment
//! is closed once it has taken bodies for half the longest retention of any stream and the next one
//! is empty. A segment goes once its last record does, so a body outlives the last record that
//! refers to it by up to about twice the longest retention.
use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use crate::error::{BusError, BusResult};
use crate::pg::datum::Jsonb;
use crate::plans::{self, Statement};

/// Segments in the ring of bodies (the partitions bussig.stream_body_0 to _3 of sql/streams.sql).
const SEGMENTS: i32 = 4;

/// Where a shared payload is stored.
#[derive(Clone, Copy, Debug)]
pub struct Body {
    pub segment: i32,
    pub body_id: i64,
}

// A writing statement, for a new snapshot: it must see every body the record read just before did
// (a long poll's records may have come after the call's own snapshot).
static PAYLOAD: Statement = Statement {
    sql: "SELECT payload FROM bussig.stream_body WHERE segment = $1 AND body_id = $2",
    args: &[pg_sys::INT4OID, pg_sys::INT8OID],
    writes: true,
};

static STORE: Statement = Statement {
    sql: "INSERT INTO bussig.stream_body (segment, payload)
          SELECT current_segment, $1 FROM bussig.stream_body_ring
          RETURNING segment, body_id",
    args: &[pg_sys::JSONBOID],
    writes: true,
};

// Segments other than the current one that hold bodies, with their tables. None in the hour after
// the ring was made, by CREATE EXTENSION or its update: a restore loads bodies and the records that
// refer to them in any order, and meanwhile a body may look unreferenced.
static HELD: Statement = Statement {
    sql: concat!(
        "SELECT s.segment, pg_catalog.to_regclass(format('bussig.stream_body_%s', s.segment))::oid
          FROM generate_series(0, $1 - 1) s(segment), bussig.stream_body_ring ring
          WHERE s.segment <> ring.current_segment
            AND NOT ",
        made_within_the_hour!(),
        "
            AND EXISTS (SELECT FROM bussig.stream_body b WHERE b.segment = s.segment)
          ORDER BY s.segment"
    ),
    args: &[pg_sys::INT4OID],
    writes: true,
};

static REFERENCED: Statement = Statement {
    sql: "SELECT bussig.stream_body_referenced($1)",
    args: &[pg_sys::INT4OID],
    writes: true,
};

// The next segment takes over once the current one has taken bodies for half the longest retention
// (at least a second), if it is empty. A ring without bodies stays put, writing nothing.
static ROTATE: Statement = Statement {
    sql: "UPDATE bussig.stream_body_ring r
          SET current_segment = (r.current_segment + 1) % $1, switched_at = clock_timestamp()
          WHERE r.switched_at <= clock_timestamp()
                - greatest((SELECT max(retention) FROM bussig.stream) / 2, interval '1 second')
            AND EXISTS (SELECT FROM bussig.stream_body b WHERE b.segment = r.current_segment)
            AND NOT EXISTS (SELECT FROM bussig.stream_body b WHERE b.segment = (r.current_segment + 1) % $1)",
    args: &[pg_sys::INT4OID],
    writes: true,
};

/// Stores a payload shared by the records of one publish.
pub fn store(client: &mut SpiClient<'_>, payload: Jsonb) -> BusResult<Body> {
    let Some(row) = plans::run(client, &STORE, &[payload.into()])?.next() else {
        return Err(BusError::Corrupt(
            "bussig.stream_body_ring has lost its row".into(),
        ));
    };
    Ok(Body {
        segment: plans::filled(&row, 1, "body segment")?,
        body_id: plans::filled(&row, 2, "body id")?,
    })
}

/// The payload a body holds.
pub fn payload(client: &mut SpiClient<'_>, body: Body) -> BusResult<Jsonb> {
    plans::first_value::<Jsonb>(
        client,
        &PAYLOAD,
        &[body.segment.into(), body.body_id.into()],
    )?
    .ok_or_else(|| {
        BusError::Corrupt(format!(
            "its body {} of segment {} is missing",
            body.body_id, body.segment
        ))
    })
}

fn referenced(client: &mut SpiClient<'_>, segment: i32) -> BusResult<bool> {
    Ok(plans::first_value::<bool>(client, &REFERENCED, &[segment.into()])?.unwrap_or(true))
}

/// The worker's step (with stream retention): empties the body segments no kept record refers to,
/// then moves the ring on when due. How many segments were emptied.
pub fn collect(client: &mut SpiClient<'_>) -> BusResult<i64> {
    // The look after the lock needs a snapshot taken after it: a caller's REPEATABLE READ
    // transaction would miss a publish that committed meanwhile.
    if crate::pg::xact::snapshot_is_fixed() {
        return Ok(0);
    }
    let mut held = Vec::new();
    for row in plans::run(client, &HELD, &[SEGMENTS.into()])? {
        let segment: i32 = plans::filled(&row, 1, "body segment")?;
        held.push((
            segment,
            row.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
        ));
    }
    let mut emptied = 0;
    for (segment, relation) in held {
        // Looked at before the lock, so that a segment still in use is not locked against readers;
        // and again after it: a publish that stored a body there holds the table until it ends, so
        // once locked, every record referring to the segment has committed or gone.
        if relation == pg_sys::InvalidOid
            || referenced(client, segment)?
            || !crate::pg::locks::try_lock_exclusive(
                relation,
                super::SEGMENT_LOCK_TRIES,
                super::SEGMENT_LOCK_PAUSE,
            )
            || referenced(client, segment)?
        {
            continue;
        }
        client.update(
            format!("TRUNCATE bussig.stream_body_{segment}").as_str(),
            None,
            &[],
        )?;
        emptied += 1;
    }
    plans::run(client, &ROTATE, &[SEGMENTS.into()])?;
    Ok(emptied)
}
