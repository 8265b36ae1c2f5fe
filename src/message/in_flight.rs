//! A queue's cap on messages locked at once (`max_in_flight`), across all its consumers. The queue has
//! that many slots (`bussig.in_flight_slot`); a read first claims free slots, reads at most as many
//! messages, and writes into each slot the message it locked and its lock token. A slot is free once
//! its message no longer holds that token under a lock in force: acked, given back, dead-lettered,
//! purged or its lock run out. Nothing else has to keep the slots right: their state follows the
//! messages'.
//!
//! Readers claim slots with FOR UPDATE SKIP LOCKED, so they do not queue behind each other. A slot a
//! commit filled after the claim's snapshot may look free to it: FOR UPDATE then locks the new version,
//! but judges its message by the old snapshot, which does not see that message's lock. So a claim is
//! checked again in a statement of its own, whose snapshot sees what the slot's last writer committed;
//! and the claim skips such slots where it can tell. Every statement that locks a message of a capped
//! queue (a read, extend_lock) writes its slot, so the slot's row lock orders them all.
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use pgrx::Uuid;

use crate::error::BusResult;
use crate::pg::wakeup;
use crate::plans::{self, Statement};

// Up to {limit} free slots of queue $1, locked for this transaction.
static CLAIM: Statement = Statement {
    sql: "SELECT s.slot FROM bussig.in_flight_slot s
          WHERE s.queue_id = $1
            AND (s.xmax = '0'::xid OR NOT bussig.superseded(s.tableoid, s.ctid))
            AND NOT EXISTS (SELECT FROM bussig.message m
                            WHERE m.message_id = s.message_id AND m.lock_token = s.lock_token
                              AND m.visible_at > clock_timestamp())
          ORDER BY s.slot
          LIMIT {limit}
          FOR UPDATE OF s SKIP LOCKED",
    args: &[pg_sys::INT4OID],
    writes: true,
};

// Which of the slots $2 of queue $1 the caller locked are free: a new snapshot, taken after the lock,
// sees the commit that last filled each one (see the module's comment).
static STILL_FREE: Statement = Statement {
    sql: "SELECT s.slot FROM bussig.in_flight_slot s
          WHERE s.queue_id = $1 AND s.slot = ANY ($2)
            AND NOT EXISTS (SELECT FROM bussig.message m
                            WHERE m.message_id = s.message_id AND m.lock_token = s.lock_token
                              AND m.visible_at > clock_timestamp())
          ORDER BY s.slot",
    args: &[pg_sys::INT4OID, pg_sys::INT4ARRAYOID],
    writes: true,
};

// The messages a read locked ($3, $4) take the slots it claimed ($2), one each.
static RECORD: Statement = Statement {
    sql: "UPDATE bussig.in_flight_slot s
          SET message_id = taken.message_id, lock_token = taken.lock_token
          FROM unnest($2::int[], $3::bigint[], $4::uuid[]) AS taken(slot, message_id, lock_token)
          WHERE s.queue_id = $1 AND s.slot = taken.slot",
    args: &[
        pg_sys::INT4OID,
        pg_sys::INT4ARRAYOID,
        pg_sys::INT8ARRAYOID,
        pg_sys::UUIDARRAYOID,
    ],
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
    sql: "INSERT INTO bussig.in_flight_slot (queue_id, slot, message_id, lock_token)
          SELECT $1, slots.slot, locked.message_id, locked.lock_token
          FROM generate_series(1, $2) AS slots(slot)
          LEFT JOIN (
              SELECT m.message_id, m.lock_token, row_number() OVER (ORDER BY m.visible_at DESC) AS nth
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
    pub fn record(self, client: &mut SpiClient<'_>, locked: Vec<(i64, Uuid)>) -> BusResult<()> {
        if locked.is_empty() {
            return Ok(());
        }
        let slots: Vec<i32> = self.slots.into_iter().take(locked.len()).collect();
        let (ids, tokens): (Vec<i64>, Vec<Uuid>) = locked.into_iter().unzip();
        let args = [
            self.queue_id.into(),
            slots.into(),
            ids.into(),
            tokens.into(),
        ];
        plans::run(client, &RECORD, &args)?;
        Ok(())
    }
}

/// Claims up to `wanted` free slots of capped queue `queue_id`.
pub fn claim(client: &mut SpiClient<'_>, queue_id: i32, wanted: i32) -> BusResult<Claimed> {
    let locked: Vec<i32> = plans::run_limited(client, &CLAIM, wanted, &[queue_id.into()])?
        .map(|row| plans::filled(&row, 1, "slot"))
        .collect::<BusResult<_>>()?;
    if locked.is_empty() {
        return Ok(Claimed { queue_id, slots: locked });
    }
    let slots = plans::run(client, &STILL_FREE, &[queue_id.into(), locked.into()])?
        .map(|row| plans::filled(&row, 1, "slot"))
        .collect::<BusResult<_>>()?;
    Ok(Claimed { queue_id, slots })
}

/// Queue `queue_id`'s cap is now `cap`: its slots are made anew, holding messages locked now, as
/// many as there are slots. A new cap takes no lock back: messages locked beyond it keep their locks
/// and are not counted. Waiting readers are woken at commit: a higher cap or none may let them read.
pub fn set_cap(client: &mut SpiClient<'_>, queue_id: i32, cap: Option<i32>) -> BusResult<()> {
    plans::run(client, &CLEAR, &[queue_id.into()])?;
    if let Some(cap) = cap {
        plans::run(client, &FILL, &[queue_id.into(), cap.into()])?;
    }
    wakeup::note_ready(queue_id, u32::try_from(cap.unwrap_or(i32::MAX)).unwrap_or(u32::MAX));
    Ok(())
}

/// `count` messages of capped queue `queue_id` left their slots (acked, dead-lettered): as many
/// waiting readers are woken at commit, as when messages arrive.
pub fn freed(queue_id: i32, count: i64) {
    if count > 0 {
        wakeup::note_ready(queue_id, u32::try_from(count).unwrap_or(u32::MAX));
    }
}
