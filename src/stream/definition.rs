//! Creating, changing and dropping streams, each with its own table: records partitioned by segment.
use pgrx::datum::Interval;
use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use super::{find, require, StreamPrivilege, SEGMENTS};
use crate::access::Caller;
use crate::error::{BusError, BusResult};
use crate::plans::{self, Statement};

static INSERT_STREAM: Statement = Statement {
    sql: "INSERT INTO bussig.stream (name, partitions, retention, retention_bytes, owner)
          VALUES ($1, $2, $3, $4, pg_catalog.pg_get_userbyid($5))
          ON CONFLICT (name) DO NOTHING
          RETURNING stream_id",
    args: &[
        pg_sys::TEXTOID,
        pg_sys::INT4OID,
        pg_sys::INTERVALOID,
        pg_sys::INT8OID,
        pg_sys::OIDOID,
    ],
    writes: true,
};

// The ring's first segment takes appends from now on; the others wait empty.
static INSERT_PARTS: Statement = Statement {
    sql: "WITH segments AS (
              INSERT INTO bussig.stream_segment (stream_id, segment, opened_at)
              SELECT $1, s, CASE WHEN s = 0 THEN clock_timestamp() END FROM generate_series(0, $3 - 1) s)
          INSERT INTO bussig.stream_partition (stream_id, partition)
          SELECT $1, p FROM generate_series(0, $2 - 1) p",
    args: &[pg_sys::INT4OID, pg_sys::INT4OID, pg_sys::INT4OID],
    writes: true,
};

static UPDATE_RETENTION: Statement = Statement {
    sql: "UPDATE bussig.stream
          SET retention = coalesce($2, retention),
              retention_bytes = CASE WHEN $4 THEN NULL ELSE coalesce($3, retention_bytes) END
          WHERE stream_id = $1",
    args: &[
        pg_sys::INT4OID,
        pg_sys::INTERVALOID,
        pg_sys::INT8OID,
        pg_sys::BOOLOID,
    ],
    writes: true,
};

static DELETE_STREAM: Statement = Statement {
    sql: "DELETE FROM bussig.stream WHERE stream_id = $1",
    args: &[pg_sys::INT4OID],
    writes: true,
};

// Streams' tables that record no dependency on the extension: pg_restore makes them without one.
static UNADOPTED: Statement = Statement {
    sql: "SELECT t.oid FROM bussig.stream s
          CROSS JOIN LATERAL pg_catalog.to_regclass(format('bussig.stream_%s', s.stream_id)) AS t(oid)
          WHERE t.oid IS NOT NULL
            AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                            WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = t.oid
                              AND d.objsubid = 0 AND d.refclassid = 'pg_catalog.pg_extension'::regclass)",
    args: &[],
    writes: true,
};

/// The checked settings of create_stream and alter_stream.
pub struct Retention {
    pub retention: Option<Interval>,
    pub retention_bytes: Option<i64>,
}

impl Retention {
    pub fn check(retention: Option<Interval>, retention_bytes: Option<i64>) -> BusResult<Self> {
        if let Some(retention) = &retention {
            crate::validate::positive(retention, "retention")?;
        }
        if matches!(retention_bytes, Some(bytes) if bytes <= 0) {
            return Err(BusError::invalid("retention_bytes", "it must be positive"));
        }
        Ok(Retention {
            retention,
            retention_bytes,
        })
    }
}

/// The statements that make a stream's table: records by segment, each segment a table of its own
/// that retention can TRUNCATE. Records get their seq when they become readable (`sequence`): one
/// partial index finds those still waiting, in the order of their ids (numbering starts past the ids
/// it knows are done, not at the first entry of a record numbered since a snapshot still held), the
/// other the numbered ones by seq. Neither holds a NULL, so an append's index entry is compared by
/// its fixed-width columns, not through the slow path a NULL in the key takes. A record `publish`
/// appended to several streams has no payload: it refers to a shared body (`body`), and the index on
/// body_segment tells when a segment of bodies may go.
fn table_ddl(stream_id: i32) -> Vec<String> {
    let table = super::table_of(stream_id);
    let mut ddl = vec![
        format!(
            "CREATE TABLE {table} (
                 record_id   bigint NOT NULL DEFAULT nextval('bussig.stream_record_id_seq'),
                 segment     int NOT NULL,
                 partition   int NOT NULL,
                 seq         bigint,
                 appended_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                 key         text,
                 subject     text,
                 payload     jsonb,
                 headers     jsonb,
                 body_segment int,
                 body_id      bigint
             ) PARTITION BY LIST (segment)"
        ),
        format!("CREATE INDEX ON {table} (partition, record_id) WHERE seq IS NULL"),
        format!("CREATE INDEX ON {table} (partition, seq) WHERE seq IS NOT NULL"),
        format!("CREATE INDEX ON {table} (body_segment) WHERE body_segment IS NOT NULL"),
    ];
    for segment in 0..SEGMENTS {
        ddl.push(format!(
            "CREATE TABLE {table}_{segment} PARTITION OF {table} FOR VALUES IN ({segment})
             WITH (autovacuum_vacuum_scale_factor = 0.05)"
        ));
    }
    ddl
}

/// create_stream: true when made, false when a stream of that name existed (left untouched).
pub fn create(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    partitions: i32,
    retention: Retention,
) -> BusResult<bool> {
    if !(1..=super::MAX_PARTITIONS).contains(&partitions) {
        return Err(BusError::invalid(
            "partitions",
            format!(
                "{partitions} is not between 1 and {}",
                super::MAX_PARTITIONS
            ),
        ));
    }
    if find(client, name)?.is_some() {
        return Ok(false);
    }
    caller
        .require_create(client, name)
        .map_err(|_| super::denied(caller, "create", name))?;
    let args = [
        name.into(),
        partitions.into(),
        retention.retention.into(),
        retention.retention_bytes.into(),
        caller.role().into(),
    ];
    let Some(stream_id) = plans::first_value::<i32>(client, &INSERT_STREAM, &args)? else {
        return Ok(false);
    };
    plans::run(
        client,
        &INSERT_PARTS,
        &[stream_id.into(), partitions.into(), SEGMENTS.into()],
    )?;
    // A table of this new id is an orphan of an earlier install in this database whose tables did
    // not depend on the extension (a restored one's, before the worker adopted them), so that DROP
    // EXTENSION left it.
    let relation = || {
        let name =
            std::ffi::CString::new(format!("stream_{stream_id}")).expect("no NUL in a number");
        crate::pg::catalog::bussig_relation(&name)
    };
    if relation() != pg_sys::InvalidOid {
        let orphan = super::table_of(stream_id);
        pgrx::warning!("bussig: dropping {orphan}, a stream table left by an earlier install");
        client.update(format!("DROP TABLE {orphan}").as_str(), None, &[])?;
    }
    for statement in table_ddl(stream_id) {
        client.update(statement.as_str(), None, &[])?;
    }
    crate::pg::catalog::depend_on_extension(relation());
    Ok(true)
}

/// Makes the tables of restored streams depend on the extension, as create_stream makes them: how
/// many. A step the worker runs with its statistics step (and `bussig.run_maintenance()`).
pub fn adopt_restored(client: &mut SpiClient<'_>) -> BusResult<i64> {
    let tables: Vec<pg_sys::Oid> = plans::first_column(client, &UNADOPTED, &[])?;
    let adopted = tables
        .into_iter()
        .filter(|&table| crate::pg::catalog::depend_on_extension(table))
        .count();
    Ok(adopted as i64)
}

/// alter_stream: new retention by age and/or size; `no_size_limit` removes the size limit.
pub fn alter(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    retention: Retention,
    no_size_limit: bool,
) -> BusResult<()> {
    let stream = require(client, caller, name, StreamPrivilege::Manage)?;
    let args = [
        stream.stream_id.into(),
        retention.retention.into(),
        retention.retention_bytes.into(),
        no_size_limit.into(),
    ];
    plans::run(client, &UPDATE_RETENTION, &args)?;
    Ok(())
}

/// drop_stream: the stream with its records, groups, grants and subscriptions; false when there was
/// none.
pub fn drop(client: &mut SpiClient<'_>, caller: &Caller, name: &str) -> BusResult<bool> {
    let stream = match require(client, caller, name, StreamPrivilege::Manage) {
        Err(BusError::UnknownStream(_)) => return Ok(false),
        found => found?,
    };
    plans::run(client, &DELETE_STREAM, &[stream.stream_id.into()])?;
    let drop_table = format!("DROP TABLE IF EXISTS {}", stream.table());
    client.update(drop_table.as_str(), None, &[])?;
    Ok(true)
}
