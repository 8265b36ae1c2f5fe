//! Receiving: read and ack_and_read lock ready messages in delivery order, each under a new lock
//! token, and can wait for more (the long poll, woken by committing sends).
use std::time::{Duration, Instant};

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::spi::{SpiClient, SpiHeapTupleData};
use pgrx::Uuid;

use super::dead_letter::{bury, Dead, DeadReason};
use super::in_flight;
use super::read_position::{self, Position};
use super::settle::acknowledge;
use super::{missing_body, nothing_done};
use crate::access::{self, Privilege};
use crate::depth;
use crate::error::BusResult;
use crate::pg::datum::{ArrayShape, BigintArray, Jsonb, UuidArray};
use crate::pg::{arrivals, wakeup, xact};
use crate::plans::{self, Statement};
use crate::queue;
use crate::validate;

/// A read: `$picked` chooses the messages (`message_id`, `ready_at` and the `row_ctid` it locked, at
/// most {limit}, with SKIP LOCKED); every read delivers them the same way. The update finds each row by
/// the ctid it locked, not through the primary key again. A row that a commit the statement's snapshot
/// does not see had changed just before it was locked is then left out of this read, ready for the next.
macro_rules! read_statement {
    ($($picked:expr),+) => {
        concat!(
            "WITH q AS (
                 SELECT queue_id, max_deliveries, message_ttl, lock_timeout,
                        dead_letter_queue_id IS NOT NULL AS has_dead_letter_queue, clock_timestamp() AS now
                 FROM bussig.queue WHERE name = $1
             ), picked AS (",
            $($picked),+,
            ")
             UPDATE bussig.message by_ctid
             SET visible_at = q.now + coalesce($2, q.lock_timeout),
                 lock_token = bussig.lock_token(),
                 delivery_count = by_ctid.delivery_count + 1,
                 final_delivery = q.has_dead_letter_queue AND by_ctid.delivery_count + 1 >= q.max_deliveries
             FROM picked, q
             WHERE by_ctid.ctid = picked.row_ctid
             RETURNING by_ctid.message_id, by_ctid.lock_token, by_ctid.subject,
                       coalesce(by_ctid.payload, (SELECT b.payload FROM bussig.body b WHERE b.body_id = by_ctid.body_id)),
                       by_ctid.headers, by_ctid.delivery_count,
                       by_ctid.priority, by_ctid.enqueued_at, by_ctid.correlation_id, by_ctid.reply_to, picked.ready_at,
                       CASE WHEN q.message_ttl IS NOT NULL AND by_ctid.enqueued_at <= q.now - q.message_ttl
                                 THEN 'expired'
                            WHEN q.has_dead_letter_queue AND by_ctid.delivery_count > q.max_deliveries
                                 THEN 'max_deliveries'
                       END AS dead_reason,
                       q.has_dead_letter_queue, q.queue_id, by_ctid.group_id, by_ctid.visible_at"
        )
    };
}

// Locks up to {limit} ready messages in delivery order, skipping rows other consumers hold, are taking
// or have already replaced since the statement's snapshot (see superseded.rs). A message past its TTL or its
// last allowed delivery comes back flagged with dead_reason instead of being handed out; the caller
// moves it to the dead-letter queue in the same transaction. Each priority's range is read on its own,
// highest first, and only as far as its ready messages go: a scan of the whole queue's range would
// walk every locked and delayed message of it when none is ready (no skip scan in PostgreSQL 15).
// The nested loop stops pulling, and so locking, once it has {limit} rows.
// Priority $3's range is read from the position $4 (ready_at), $5 (message_id) (read_position.rs), so
// that its index scan starts there; the others from their heads. From the head, the position is
// '-infinity' in the priority `read_position::priority_hint` gives. Finding the priorities walks no
// front of $3's range (`priorities_around!`).
static READ: Statement = Statement {
    sql: read_statement!(
        "WITH RECURSIVE ",
        priorities_around!("(SELECT queue_id FROM q)", "$3"),
        "
         SELECT ready.message_id, ready.ready_at, ready.row_ctid
         FROM in_turn CROSS JOIN LATERAL (
             SELECT in_order.message_id, in_order.visible_at AS ready_at, in_order.ctid AS row_ctid
             FROM bussig.message in_order
             WHERE in_order.queue_id = (SELECT queue_id FROM q) AND in_order.priority = in_turn.priority
               AND (in_order.visible_at, in_order.message_id)
                   >= (CASE WHEN in_turn.priority = $3 THEN $4 ELSE '-infinity'::timestamptz END, $5)
               AND in_order.visible_at <= (SELECT now FROM q)
               AND (in_order.xmax = '0'::xid OR NOT bussig.superseded(in_order.tableoid, in_order.ctid))
             ORDER BY in_order.visible_at, in_order.message_id
             FOR UPDATE SKIP LOCKED
         ) ready
         LIMIT {limit}"
    ),
    args: &[
        pg_sys::TEXTOID,
        pg_sys::INTERVALOID,
        pg_sys::INT4OID,
        pg_sys::TIMESTAMPTZOID,
        pg_sys::INT8OID,
    ],
    writes: true,
};

pub struct Delivery {
    /// The message's id, priority and when it became ready: its place in delivery order.
    pub position: Position,
    pub lock_token: Uuid,
    pub subject: Option<String>,
    pub payload: Jsonb,
    pub headers: Option<Jsonb>,
    pub delivery_count: i32,
    pub enqueued_at: TimestampWithTimeZone,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub group_id: Option<String>,
}

/// What READ returns for each message it locked: a delivery, or a message to
/// dead-letter instead.
struct ReadRow {
    position: Position,
    lock_token: Uuid,
    subject: Option<String>,
    /// None only when the shared body row it was published with is gone (and `dead` says so).
    payload: Option<Jsonb>,
    headers: Option<Jsonb>,
    delivery_count: i32,
    enqueued_at: TimestampWithTimeZone,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    group_id: Option<String>,
    /// Why it may not be delivered, and whether its queue has a dead-letter queue.
    dead: Option<(DeadReason, bool)>,
}

impl ReadRow {
    fn decode(row: &SpiHeapTupleData<'_>) -> BusResult<ReadRow> {
        // Only what a delivery needs is read: every column read costs a conversion per message.
        let payload: Option<Jsonb> = row.get(4)?;
        let reason = match row.get::<String>(12)? {
            Some(reason) => Some(DeadReason::parse(&reason)?),
            None if payload.is_none() => Some(DeadReason::BodyMissing),
            None => None,
        };
        let dead = match reason {
            Some(reason) => Some((reason, plans::filled(row, 13, "dead-letter flag")?)),
            None => None,
        };
        Ok(ReadRow {
            position: Position {
                priority: plans::filled(row, 7, "priority")?,
                ready_at: plans::filled(row, 11, "ready time")?,
                message_id: plans::filled(row, 1, "message id")?,
            },
            lock_token: plans::filled(row, 2, "lock token")?,
            subject: row.get(3)?,
            payload,
            headers: row.get(5)?,
            delivery_count: plans::filled(row, 6, "delivery count")?,
            enqueued_at: plans::filled(row, 8, "enqueue time")?,
            correlation_id: row.get(9)?,
            reply_to: row.get(10)?,
            group_id: row.get(15)?,
            dead,
        })
    }

    /// The delivery of a row not dead; XX001 when neither the message nor a body row holds its
    /// payload (`decode` makes such a row dead).
    fn delivery(self, queue: &str) -> BusResult<Delivery> {
        let Some(payload) = self.payload else {
            return Err(missing_body(self.position.message_id, queue));
        };
        Ok(Delivery {
            position: self.position,
            lock_token: self.lock_token,
            subject: self.subject,
            payload,
            headers: self.headers,
            delivery_count: self.delivery_count,
            enqueued_at: self.enqueued_at,
            correlation_id: self.correlation_id,
            reply_to: self.reply_to,
            group_id: self.group_id,
        })
    }
}

/// What one READ of `receive` locked.
struct ReadRound {
    /// Rows returned, dead ones included.
    returned: i32,
    delivered: Vec<Delivery>,
    dead: Vec<Dead>,
    /// The first in delivery order, dead or not.
    first: Option<Position>,
}

/// Runs READ (from the position `start`, or from the head) for up to `limit` messages of the queue (`queue_id`
/// when it is known) and sorts what it locked.
fn read_round(
    client: &mut SpiClient<'_>,
    queue: &str,
    queue_id: Option<i32>,
    limit: i32,
    lock_timeout: Option<Interval>,
    start: Option<Position>,
) -> BusResult<ReadRound> {
    let from = start.unwrap_or_else(|| Position {
        priority: queue_id.map_or(0, read_position::priority_hint),
        ready_at: TimestampWithTimeZone::negative_infinity(),
        message_id: i64::MIN,
    });
    let args = [
        queue.into(),
        lock_timeout.into(),
        from.priority.into(),
        from.ready_at.into(),
        from.message_id.into(),
    ];
    let rows = plans::run_limited(client, &READ, limit, &args)?;
    let mut round = ReadRound {
        returned: 0,
        delivered: Vec::new(),
        dead: Vec::new(),
        first: None,
    };
    let mut read_queue = 0;
    let mut locks = read_position::Locks::default();
    for row in rows {
        if round.returned == 0 {
            read_queue = plans::filled(&row, 14, "queue id")?;
            depth::touched(read_queue);
            // The same for every row of the statement.
            locks.until =
                plans::filled::<TimestampWithTimeZone>(&row, 16, "lock end")?.into_inner();
        }
        let row = ReadRow::decode(&row)?;
        round.returned += 1;
        let position = row.position;
        if round.first.is_none_or(|first| position < first) {
            round.first = Some(position);
        }
        locks.add(position);
        match row.dead {
            Some((reason, has_dead_letter_queue)) => round.dead.push(Dead {
                message_id: position.message_id,
                reason,
                has_dead_letter_queue,
            }),
            None => round.delivered.push(row.delivery(queue)?),
        }
    }
    wakeup::note_locked(read_queue, u32::try_from(round.returned).unwrap_or(0));
    read_position::note_locked(read_queue, locks);
    Ok(round)
}

/// As `read_round`, for a queue with a cap on messages in flight: at most as many as it can claim
/// slots for. A slot claimed and not used stays locked until the claim's transaction ends, keeping
/// other readers from it: harmless for a read in a statement's own transaction, which ends with it,
/// but not for one in a transaction block that goes on, or a reader about to wait (`release_unused`).
/// Those claim in a subtransaction, rolled back unless every claim was used, and claim again for as
/// many as were found.
fn capped_round(
    client: &mut SpiClient<'_>,
    queue: &str,
    queue_id: i32,
    mut wanted: i32,
    lock_timeout: Option<Interval>,
    start: Option<Position>,
    release_unused: bool,
) -> BusResult<(i32, ReadRound)> {
    let exact = release_unused || xact::in_transaction_block();
    loop {
        let round = |client: &mut SpiClient<'_>| -> BusResult<(i32, ReadRound)> {
            let claimed = in_flight::claim(client, queue_id, wanted)?;
            let limit = claimed.count();
            if limit == 0 {
                return Ok((0, ReadRound::empty()));
            }
            let round = read_round(client, queue, Some(queue_id), limit, lock_timeout, start)?;
            let locked = round
                .delivered
                .iter()
                .map(|delivery| delivery.position.message_id)
                .collect();
            claimed.record(client, locked)?;
            Ok((limit, round))
        };
        if !exact {
            return round(client);
        }
        let all_used = |(limit, round): &(i32, ReadRound)| round.returned == *limit;
        let (limit, found) = xact::in_subtransaction(|| round(client), all_used)?;
        if found.returned == limit || found.returned == 0 {
            // Kept, or rolled back with nothing found.
            let found = if found.returned == limit {
                found
            } else {
                ReadRound::empty()
            };
            return Ok((limit, found));
        }
        // Rolled back: fewer were there than claimed.
        wanted = found.returned;
    }
}

impl ReadRound {
    fn empty() -> ReadRound {
        ReadRound {
            returned: 0,
            delivered: Vec::new(),
            dead: Vec::new(),
            first: None,
        }
    }
}

/// What a read delivered, and whether it locked any message (to deliver or to dead-letter): whether
/// it changed anything that must outlive it.
struct Received {
    delivered: Vec<Delivery>,
    locked_any: bool,
}

fn receive(
    client: &mut SpiClient<'_>,
    queue: &str,
    max_messages: i32,
    lock_timeout: Option<Interval>,
    release_unused: bool,
) -> BusResult<Received> {
    let found = queue::find(client, queue)?;
    let queue_id = found.as_ref().map(|found| found.queue_id);
    let cap = found.filter(|found| found.max_in_flight.is_some());
    let mut delivered = Vec::new();
    let mut locked_any = false;
    loop {
        let wanted = max_messages - delivered.len() as i32;
        let recalled = queue_id.map(read_position::recall);
        let start = recalled.and_then(|recalled| recalled.start);
        let (limit, round) = match cap {
            Some(capped) => capped_round(
                client,
                queue,
                capped.queue_id,
                wanted,
                lock_timeout,
                start,
                release_unused,
            )?,
            None => (
                wanted,
                read_round(client, queue, queue_id, wanted, lock_timeout, start)?,
            ),
        };
        let ReadRound {
            returned,
            delivered: more,
            dead,
            first,
        } = round;
        delivered.extend(more);
        locked_any |= returned > 0;
        let took_all = limit > 0 && returned == limit;
        let complete = recalled.is_none_or(|recalled| recalled.complete);
        if let (Some(queue_id), Some(recalled)) = (queue_id, recalled) {
            match first {
                Some(first) => read_position::remember(queue_id, recalled, first, took_all),
                None if !complete => read_position::forget(queue_id),
                None => {}
            }
        }
        let more_may_be_ready = took_all && !dead.is_empty();
        bury(client, Some(queue), dead)?;
        // A position a read from which may miss messages: what it did not find, it reads from the head.
        if start.is_some() && !took_all && !complete {
            continue;
        }
        if returned == 0 && delivered.is_empty() {
            nothing_done(client, queue, ())?;
            return Ok(Received {
                delivered,
                locked_any,
            });
        }
        if !more_may_be_ready {
            break;
        }
    }
    // RETURNING gives no order: restore delivery order.
    delivered.sort_by_key(|delivery| delivery.position);
    Ok(Received {
        delivered,
        locked_any,
    })
}

// Seconds until the first message that was not ready when the last read began ($2, seconds since the
// epoch) becomes ready; negative when it already has. Measured from that moment, not from now: a delay
// that runs out between the read and this probe must end the sleep, not be missed until the wait ends.
// A writing statement, so that it takes a new snapshot and sees messages committed during the wait.
// Only up to the end of the wait ($3): past it nothing matters, and the index range after the read
// holds an entry for every message acked within the lock timeout (their last lock's end), dead until
// vacuum; walking them all on every empty read was the most of a long-polling reader's work. The
// priorities are found around $4 (the read position's): under a held snapshot, a probe from the
// front of the queue's range walked every message consumed since it began, on every empty read.
static NEXT_READY: Statement = Statement {
    sql: concat!(
        "WITH RECURSIVE ",
        priorities_around!("$1", "$4"),
        "
         SELECT extract(epoch FROM min(later.visible_at) - clock_timestamp())::float8
         FROM in_turn CROSS JOIN LATERAL (
             SELECT in_order.visible_at FROM bussig.message in_order
             WHERE in_order.queue_id = $1 AND in_order.priority = in_turn.priority
               AND in_order.visible_at > to_timestamp($2) AND in_order.visible_at <= to_timestamp($3)
             ORDER BY in_order.visible_at LIMIT 1) later"
    ),
    args: &[
        pg_sys::INT4OID,
        pg_sys::FLOAT8OID,
        pg_sys::FLOAT8OID,
        pg_sys::INT4OID,
    ],
    writes: true,
};

/// The wall clock as seconds since the epoch, the clock PostgreSQL's clock_timestamp() reads.
pub(super) fn epoch_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// The arguments of read and ack_and_read, checked.
pub struct ReadRequest {
    pub max_messages: i32,
    lock_timeout: Option<Interval>,
    wait: Duration,
}

impl ReadRequest {
    pub fn check(
        max_messages: Option<i32>,
        lock_timeout: Option<Interval>,
        wait: Option<Interval>,
    ) -> BusResult<ReadRequest> {
        let wait = match wait {
            Some(wait) => {
                validate::not_negative(&wait, "wait")?;
                Duration::from_micros(wait.as_micros().clamp(0, u64::MAX as i128) as u64)
            }
            None => Duration::ZERO,
        };
        Ok(ReadRequest {
            max_messages: validate::max_messages(max_messages)?,
            lock_timeout: validate::lock_timeout(lock_timeout)?,
            wait,
        })
    }
}

/// Reads what is ready, acknowledging `acks` first in the same call (ack_and_read); with a wait,
/// sleeps until a commit makes messages ready in the queue, a delay or lock runs out, or the wait is
/// over, and reads again.
pub fn receive_waiting(
    queue: &str,
    request: ReadRequest,
    mut acks: Option<(BigintArray, UuidArray)>,
) -> BusResult<Vec<Delivery>> {
    let ReadRequest {
        max_messages,
        lock_timeout,
        mut wait,
    } = request;
    let started = Instant::now();
    let mut waiting: Option<wakeup::Waiting> = None;
    loop {
        let read_began = epoch_seconds();
        let registered = waiting.is_some();
        let read = access::connect(|client, caller| {
            caller.require(client, queue, Privilege::Consume)?;
            // No acks, no statement: an idle consumer's empty acks would lock the message table for
            // its wait (see below). Stale ones do, but those are rare, and a subtransaction around
            // every consumer's acks would cost each batch a second transaction id.
            if let Some(acks) = acks.take().filter(|(ids, _)| ids.shape().0 > 0) {
                // Acks commit with the call: a wait that a timeout or cancel ends would undo them.
                if acknowledge(client, queue, acks)? > 0 {
                    wait = Duration::ZERO;
                }
            }
            let may_wait = started.elapsed() < wait && !crate::pg::xact::snapshot_is_fixed();
            if !may_wait && !registered {
                let received = receive(client, queue, max_messages, lock_timeout, false)?;
                return Ok(WaitingRead::done(received.delivered));
            }
            // Noted before the read's snapshot is taken: see `arrivals`.
            let queue_id = queue::require(client, queue)?.queue_id;
            let read_from = arrivals::seen(queue_id);
            // In a subtransaction, rolled back when it locked no message (a capped queue's unused
            // slot claims are rolled back already): so a reader that sleeps next holds no lock on the
            // message table while it sleeps, and the worker's compaction, which needs the table to
            // itself for a moment, gets its turn under load.
            let (received, next_ready) = xact::in_subtransaction(
                || {
                    let received = receive(client, queue, max_messages, lock_timeout, true)?;
                    let next_ready = if received.delivered.is_empty() && may_wait {
                        let wait_ends =
                            read_began + wait.saturating_sub(started.elapsed()).as_secs_f64();
                        let pivot = read_position::priority_hint(queue_id);
                        let args = [
                            queue_id.into(),
                            read_began.into(),
                            wait_ends.into(),
                            pivot.into(),
                        ];
                        plans::first_value::<f64>(client, &NEXT_READY, &args)?
                    } else {
                        None
                    };
                    Ok((received, next_ready))
                },
                |(received, _)| received.locked_any,
            )?;
            Ok(WaitingRead {
                delivered: received.delivered,
                locked_any: received.locked_any,
                may_wait,
                queue_id,
                read_from,
                next_ready,
            })
        })?;
        let deadline = started + wait;
        let now = Instant::now();
        // A read that locked messages only to dead-letter them returns too: sleeping, it would hold
        // their rows (a group's, a cap's slot) and hide the dead letters until its wait ended.
        if !read.delivered.is_empty() || read.locked_any || !read.may_wait || now >= deadline {
            if let Some(waiting) = waiting.take() {
                let full_batch = read.delivered.len() == max_messages as usize;
                waiting.done(full_batch, read.read_from);
            }
            return Ok(read.delivered);
        }
        let read_again = match &waiting {
            Some(waiting) => waiting.rearm(read.read_from),
            None => {
                let wants = u32::try_from(max_messages).unwrap_or(1);
                let (registered, moved) =
                    wakeup::Waiting::register(read.queue_id, wants, read.read_from);
                waiting = Some(registered);
                moved
            }
        };
        if read_again {
            continue;
        }
        let until_ready = read.next_ready.map_or(Duration::MAX, |seconds| {
            Duration::from_secs_f64(seconds.max(0.0))
        });
        if let Some(waiting) = &waiting {
            waiting.sleep((deadline - now).min(until_ready));
        }
    }
}

/// What one read of a waiting reader found, and what it needs to know to wait for more.
struct WaitingRead {
    delivered: Vec<Delivery>,
    /// Whether it locked any message, delivered or dead-lettered: its subtransaction was kept.
    locked_any: bool,
    /// Whether the reader may wait after this read: time is left, and its snapshot can change.
    may_wait: bool,
    queue_id: i32,
    /// The queue's arrival count before the read began.
    read_from: u64,
    /// Seconds until the next message not ready at the read becomes ready, when it found none.
    next_ready: Option<f64>,
}

impl WaitingRead {
    /// A read that will not wait: nothing about the queue is needed.
    fn done(delivered: Vec<Delivery>) -> WaitingRead {
        WaitingRead {
            delivered,
            locked_any: false,
            may_wait: false,
            queue_id: 0,
            read_from: 0,
            next_ready: None,
        }
    }
}
