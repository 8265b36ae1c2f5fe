//! Streams for client tests: a stream dropped at the end of its test, and stream_read / stream_commit
//! as a member of a consumer group calls them.
use std::collections::BTreeMap;

use serde_json::Value;
use uuid::Uuid;

use crate::{Client, GenericClient, NoTls};

/// A stream made for one test, dropped at its end.
pub struct Stream {
    pub name: String,
}

impl Stream {
    pub fn create(client: &mut Client, test: &str, options: &str) -> Stream {
        let name = crate::unique_name(test);
        let sep = if options.is_empty() { "" } else { ", " };
        let sql = format!("SELECT bussig.create_stream($1::text{sep}{options})");
        let created: bool = client.query_one(&sql, &[&name]).expect(&sql).get(0);
        assert!(created);
        Stream { name }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(mut client) = std::env::var("BUSSIG_TEST_URL")
            .map_err(|_| ())
            .and_then(|url| Client::connect(&url, NoTls).map_err(|_| ()))
        {
            let _ = client.execute("SELECT bussig.drop_stream($1::text)", &[&self.name]);
        }
    }
}

/// One record as stream_read returns it.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub seq: i64,
    pub token: Uuid,
    pub key: Option<String>,
    pub payload: Value,
}

pub fn stream_read(
    c: &mut impl GenericClient,
    stream: &str,
    group: &str,
    max: i32,
    wait: &str,
    lease: &str,
) -> Vec<Record> {
    c.query(
        "SELECT partition, seq, lease_token, key, payload
         FROM bussig.stream_read($1::text, $2::text, $3::int, $4::text::interval, $5::text::interval)",
        &[&stream, &group, &max, &wait, &lease],
    )
    .expect("stream_read")
    .iter()
    .map(|row| Record {
        partition: row.get(0),
        seq: row.get(1),
        token: row.get(2),
        key: row.get(3),
        payload: row.get(4),
    })
    .collect()
}

/// Commits each partition's last record read: whether every lease was still the caller's.
pub fn commit_all(
    c: &mut impl GenericClient,
    stream: &str,
    group: &str,
    records: &[Record],
) -> bool {
    let mut last: BTreeMap<i32, (i64, Uuid)> = BTreeMap::new();
    for r in records {
        let entry = last.entry(r.partition).or_insert((r.seq, r.token));
        if r.seq > entry.0 {
            *entry = (r.seq, r.token);
        }
    }
    last.into_iter().all(|(partition, (seq, token))| {
        c.query_one(
            "SELECT bussig.stream_commit($1::text, $2::text, $3::int, $4::bigint, $5::uuid)",
            &[&stream, &group, &partition, &seq, &token],
        )
        .unwrap()
        .get::<_, bool>(0)
    })
}

pub fn create_group(c: &mut Client, stream: &str, group: &str, start_at: &str) {
    c.execute(
        "SELECT bussig.create_consumer_group($1::text, $2::text, $3::text)",
        &[&stream, &group, &start_at],
    )
    .unwrap();
}

/// Appends the numbers 1 to `count` as records, keyed `k1`, `k2`, … when `keyed`, in one call.
pub fn append_numbers(c: &mut Client, stream: &str, count: i32, keyed: bool) {
    let keys = if keyed { "array_agg('k' || n)" } else { "NULL" };
    c.execute(
        &format!(
            "SELECT bussig.append_batch($1::text, array_agg(to_jsonb(n)), keys => {keys})
             FROM generate_series(1, $2::int) n"
        ),
        &[&stream, &count],
    )
    .unwrap();
}

/// The records the stream's groups have still to commit, over all groups and partitions.
pub fn total_lag(c: &mut Client, stream: &str) -> i64 {
    c.query_one(
        "SELECT coalesce(sum(lag), 0)::bigint FROM bussig.consumer_groups WHERE stream = $1::text",
        &[&stream],
    )
    .unwrap()
    .get(0)
}

/// Live rows read and pages read so far in this transaction over the stream's segment tables and
/// their indexes.
pub fn stream_visits(c: &mut impl GenericClient, stream: &str) -> (i64, i64) {
    let row = c
        .query_one(
            "WITH segment AS (
                 SELECT i.inhrelid AS relid FROM pg_inherits i
                 WHERE i.inhparent = ('bussig.stream_' || (SELECT stream_id FROM bussig.stream WHERE name = $1))::regclass),
             relation AS (
                 SELECT relid FROM segment
                 UNION ALL SELECT x.indexrelid FROM pg_index x JOIN segment ON x.indrelid = segment.relid)
             SELECT coalesce(sum(pg_stat_get_xact_tuples_returned(relid) + pg_stat_get_xact_tuples_fetched(relid)), 0)::bigint,
                    coalesce(sum(pg_stat_get_xact_blocks_fetched(relid)), 0)::bigint
             FROM relation",
            &[&stream],
        )
        .unwrap();
    (row.get(0), row.get(1))
}
