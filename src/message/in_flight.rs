//! A queue's cap on messages locked at once (`max_in_flight`), across all its consumers. The queue has
//! that many slots (`bussig.in_flight_slot`); a read first claims free slots, reads at most as many
//! messages, and writes into each slot the message it locked, its lock token and when that lock ends.
//! A slot is free once that time has passed: a settle (ack, nack, dead letter, reply) and a purge set
//! it back at once, `extend_lock` moves it on, and a lock that runs out frees its slot by itself. A
//! message deleted some other way (by hand) holds its slot until its lock would have ended. Settles
//! and extend_lock lock the message first and then its slot, so that they cannot deadlock.
//!
//! So whether a slot is free is in the slot's row and nowhere else. That is what makes the claim safe:
//! readers claim with FOR UPDATE SKIP LOCKED, so they do not queue behind each other, and a slot that a
//! commit filled after the claim's snapshot is judged by its newest version, which FOR UPDATE rechecks;
//! a test of the message instead would be judged by the old snapshot, which does not see its lock.
//! Every statement that locks a message of a capped queue (a read, extend_lock) writes its slot, so the
//! slot's row lock orders them all.
use pgrx::datum::{DatumWithOid, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use pgrx::Uuid;

use crate::error::BusResult;
use crate::pg::wakeup;
use crate::plans::{self, Statement};

// Up to {limit} free slots of queue $1 as of $2 (seconds since the epoch: a bound of the index scan,
// which clock_timestamp() cannot be), locked for this transaction. Slots a commit replaced after this
// snapshot, or another reader holds, are passed over where that can be told, sparing FOR UPDATE the
// newest version's lock and the attempt at a held one.
static CLAIM: Statement = Statement {
    sql: "SELECT s.slot FROM bussig.in_flight_slot s
          WHERE s.queue_id = $1 AND s.locked_until <= to_timestamp($2)
            AND (s.xmax = '0'::xid OR NOT bussig.superseded(s.tableoid, s.ctid))
          ORDER BY s.locked_until
          LIMIT {limit}
          FOR UPDATE OF s SKIP LOCKED",
    args: &[pg_sys::INT4OID, pg_sys::FLOAT8OID],
    writes: true,
};

// The messages a read locked ($3) take the slots it claimed ($2), one each, until their locks end.
static RECORD: Statement = Statement {
    sql: "UPDATE bussig.in_flight_slot s
          SET message_id = m.message_id, lock_token = m.lock_token, locked_until = m.visible_at
          FROM unnest($2::int[], $3::bigint[]) AS taken(slot, message_id)
          JOIN bussig.message m ON m.message_id = taken.message_id
          WHERE s.queue_id = $1 AND s.slot = taken.slot",
    args: &[pg_sys::INT4OID, pg_sys::INT4ARRAYOID, pg_sys::INT8ARRAYOID],
    writes: true,
};

// Deliveries ($2, $3) of queue $1 were settled: their slots are free, and hold no delivery any more
// (a late extend_lock of one finds none). As ack_batch matches them, each message with its own token
// (tokens are random, one per delivery).
static RELEASE: Statement = Statement {
    sql: "UPDATE bussig.in_flight_slot s SET locked_until = '-infinity', message_id = NULL, lock_token = NULL
          WHERE s.message_id = ANY ($2) AND s.queue_id = $1 AND s.lock_token = ANY ($3)",
    args: &[pg_sys::INT4OID, pg_sys::INT8ARRAYOID, pg_sys::UUIDARRAYOID],
    writes: true,
};

// extend_lock of a delivery of queue $1 that holds its slot: the slot lasts as long ($4).
static EXTEND: Statement = Statement {
    sql: "UPDATE bussig.in_flight_slot s SET locked_until = $4
          WHERE s.message_id = $2 AND s.queue_id = $1 AND s.lock_token = $3
          RETURNING s.slot",
    args: &[
        pg_sys::INT4OID,
        pg_sys::INT8OID,
        pg_sys::UUIDOID,
        pg_sys::TIMESTAMPTZOID,
    ],
    writes: true,
};

// A purge: the slots of queue $1 whose messages it deleted are free. A statement after the purge's
// deletes, whose snapshot sees them, and also the messages that reads locked after theirs: those
// keep their slots.
static RELEASE_ALL: Statement = Statement {
    sql: "UPDATE bussig.in_flight_slot s SET locked_until = '-infinity', message_id = NULL, lock_token = NULL
          WHERE s.queue_id = $1 AND s.message_id IS NOT NULL
            AND NOT EXISTS (SELECT FROM bussig.message m WHERE m.message_id = s.message_id)",
    args: &[pg_sys::INT4OID],
    writes: true,
};

// A new cap: the slots are made anew, waiting for reads that hold some of them.
static CLEAR: Statement = Statement {
    sql: "DELETE FROM bussig.in_flight_slot WHERE queue_id = $1",
    args: &[pg_sys::INT4OID],
    writes: true,
};

// $2 slots, filled with messages locked now (those whose locks last longest first): a statement of its
// own after CLEAR, so that it sees what the reads CLEAR waited for locked. Walks the queue's not-ready
// range, as a change of settings may.
static FILL: Statement = Statement {
    sql: "INSERT INTO bussig.in_flight_slot (queue_id, slot, message_id, lock_token, locked_until)
          SELECT $1, slots.slot, locked.message_id, locked.lock_token, coalesce(locked.visible_at, '-infinity')
          FROM generate_series(1, $2) AS slots(slot)
          LEFT JOIN (
              SELECT m.message_id, m.lock_token, m.visible_at,
                     row_number() OVER (ORDER BY m.visible_at DESC) AS nth
              FROM bussig.message m
              WHERE m.queue_id = $1 AND m.lock_token IS NOT NULL
                AND m.visible_at > clock_timestamp() AND m.visible_at < 'infinity'
              ORDER BY m.visible_at DESC LIMIT $2
          ) locked ON locked.nth = slots.slot",
    args: &[pg_sys::INT4OID, pg_sys::INT4OID],
    writes: true,
};

/// Slots of a capped queue that a read claimed.
pub struct Claimed {
    queue_id: i32,
    slots: Vec<i32>,
}

impl Claimed {
    pub fn count(&self) -> i32 {
        self.slots.len() as i32
    }

    /// The messages the read locked take the claimed slots; the rest stay free.
    pub fn record(self, client: &mut SpiClient<'_>, locked: Vec<i64>) -> BusResult<()> {
        if locked.is_empty() {
            return Ok(());
        }
        let slots: Vec<i32> = self.slots.into_iter().take(locked.len()).collect();
        plans::run(
            client,
            &RECORD,
            &[self.queue_id.into(), slots.into(), locked.into()],
        )?;
        Ok(())
    }
}

/// Claims up to `wanted` free slots of capped queue `queue_id`.
pub fn claim(client: &mut SpiClient<'_>, queue_id: i32, wanted: i32) -> BusResult<Claimed> {
    let now = super::receive::epoch_seconds();
    let slots = plans::run_limited(client, &CLAIM, wanted, &[queue_id.into(), now.into()])?
        .map(|row| plans::filled(&row, 1, "slot"))
        .collect::<BusResult<_>>()?;
    Ok(Claimed { queue_id, slots })
}

/// Deliveries of capped queue `queue_id` were settled (acked, given back, dead-lettered, replied to):
/// their slots are free, and waiting readers are woken at commit for each slot freed.
pub fn release(
    client: &mut SpiClient<'_>,
    queue_id: i32,
    message_ids: DatumWithOid<'_>,
    lock_tokens: DatumWithOid<'_>,
) -> BusResult<()> {
    let freed = plans::run(
        client,
        &RELEASE,
        &[queue_id.into(), message_ids, lock_tokens],
    )?
    .len();
    if freed > 0 {
        wakeup::note_readable(queue_id, u32::try_from(freed).unwrap_or(u32::MAX));
    }
    Ok(())
}

/// As `release`, for one delivery.
pub fn release_one(
    client: &mut SpiClient<'_>,
    queue_id: i32,
    message_id: i64,
    lock_token: Uuid,
) -> BusResult<()> {
    release(
        client,
        queue_id,
        vec![message_id].into(),
        vec![lock_token].into(),
    )
}

/// Whether the delivery (locked by the caller) still holds its slot of queue `queue_id`; if so, the
/// slot now lasts until `until`, as its lock is about to.
pub fn extend(
    client: &mut SpiClient<'_>,
    queue_id: i32,
    message_id: i64,
    lock_token: Uuid,
    until: TimestampWithTimeZone,
) -> BusResult<bool> {
    let args = [
        queue_id.into(),
        message_id.into(),
        lock_token.into(),
        until.into(),
    ];
    Ok(!plans::run(client, &EXTEND, &args)?.is_empty())
}

/// The messages of queue `queue_id` were purged: their slots are free, and waiting readers are woken.
pub fn purged(client: &mut SpiClient<'_>, queue_id: i32) -> BusResult<()> {
    let freed = plans::run(client, &RELEASE_ALL, &[queue_id.into()])?.len();
    if freed > 0 {
        wakeup::note_readable(queue_id, u32::try_from(freed).unwrap_or(u32::MAX));
    }
    Ok(())
}

/// Queue `queue_id`'s cap is now `cap`: its slots are made anew, holding messages locked now, as
/// many as there are slots. A new cap takes no lock back: messages locked beyond it keep their locks
/// and are not counted. Waiting readers are woken at commit: a higher cap or none may let them read.
pub fn set_cap(client: &mut SpiClient<'_>, queue_id: i32, cap: Option<i32>) -> BusResult<()> {
    plans::run(client, &CLEAR, &[queue_id.into()])?;
    if let Some(cap) = cap {
        plans::run(client, &FILL, &[queue_id.into(), cap.into()])?;
    }
    wakeup::note_readable(
        queue_id,
        u32::try_from(cap.unwrap_or(i32::MAX)).unwrap_or(u32::MAX),
    );
    Ok(())
}
