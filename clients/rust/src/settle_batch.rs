//! Settling many deliveries of one queue in one statement, for loops that hold whole batches (the
//! relay): `bussig.nack` and `bussig.extend_lock` over arrays of ids and tokens. `ack_batch` is
//! bussig's own; these are its siblings.
use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::error::Result;
use crate::sql;

/// Gives every delivery back, as `nack` does one: ready again after `delay` (None: each message's
/// backoff), `error` kept as the last error, and a message on its last allowed delivery moved to the
/// dead-letter queue. How many still held their lock (stale tokens are skipped).
pub async fn nack_batch<C: GenericClient>(
    client: &C,
    queue: &str,
    deliveries: &[(i64, Uuid)],
    delay: Option<Duration>,
    error: Option<&str>,
) -> Result<i64> {
    if deliveries.is_empty() {
        return Ok(0);
    }
    let (ids, tokens): (Vec<i64>, Vec<Uuid>) = deliveries.iter().copied().unzip();
    sql::value(
        client,
        "SELECT count(*) FROM unnest($2::bigint[], $3::uuid[]) AS d(id, token)
         WHERE bussig.nack($1, d.id, d.token, $4, $5)",
        &[
            Type::TEXT,
            Type::INT8_ARRAY,
            Type::UUID_ARRAY,
            Type::INTERVAL,
            Type::TEXT,
        ],
        &[&queue, &ids, &tokens, &sql::Interval::of(delay), &error],
    )
    .await
}

/// Keeps every lock for `lock_timeout` more from now (None: the queue's lock timeout), as
/// `extend_lock` does one. The ids whose lock still held; the others were settled or read again.
pub async fn extend_lock_batch<C: GenericClient>(
    client: &C,
    queue: &str,
    deliveries: &[(i64, Uuid)],
    lock_timeout: Option<Duration>,
) -> Result<Vec<i64>> {
    if deliveries.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, tokens): (Vec<i64>, Vec<Uuid>) = deliveries.iter().copied().unzip();
    let rows = sql::query(
        client,
        "SELECT d.id FROM unnest($2::bigint[], $3::uuid[]) AS d(id, token)
         WHERE bussig.extend_lock($1, d.id, d.token, $4)",
        &[
            Type::TEXT,
            Type::INT8_ARRAY,
            Type::UUID_ARRAY,
            Type::INTERVAL,
        ],
        &[&queue, &ids, &tokens, &sql::Interval::of(lock_timeout)],
    )
    .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}
