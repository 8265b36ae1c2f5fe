//! How many messages each queue holds, answered without reading the message table. Counting rows
//! costs in proportion to the dead index entries churn leaves behind, and a held snapshot keeps them
//! all; producers, autoscalers and dashboards poll the depth all day. So each transaction notes what
//! it adds to and takes from each queue, and its commit applies that to a count in shared memory.
//!
//! A count is exact from the queue's creation on, or from a count of its rows: the first time it is
//! asked for after a restart (or the worker's next round), and again after a prepared transaction
//! changed the queue. Such a count misses nothing and counts nothing twice: commits that end while it
//! runs are added to it unless its snapshot saw them already, judged by transaction id (see
//! table.rs); a count that cannot judge them all is not kept. A transaction sees its own changes in
//! the depth it asks for.
//!
//! Without `shared_preload_libraries = 'bussig'` there is no shared memory: every ask counts rows.
mod table;

use std::cell::RefCell;

use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use crate::error::BusResult;
use crate::pg::catalog;
use crate::pg::shmem::ZeroedLwLock;
use crate::pg::snapshot::LatestSnapshot;
use crate::pg::wakeup;
use crate::pg::xact::{sum_per_key, SavepointLog};
use crate::plans::{self, Statement};
use table::{Depths, Entered, Finished, Key};

static DEPTHS: ZeroedLwLock<Depths> = ZeroedLwLock::new(c"bussig_depths");

/// What a transaction did to a queue, applied to the counts at its commit.
enum Change {
    Messages(i32, i64),
    /// Its messages changed state, not number (a read, a nack): the worker recounts the split.
    Touched(i32),
    Created(i32),
    Dropped(i32),
}

impl Change {
    fn queue_id(&self) -> i32 {
        match *self {
            Change::Messages(queue_id, _)
            | Change::Touched(queue_id)
            | Change::Created(queue_id)
            | Change::Dropped(queue_id) => queue_id,
        }
    }
}

#[derive(Default)]
struct Pending {
    /// bussig.message's storage (`message_storage`), looked up with the transaction's first change.
    relation: u32,
    changes: SavepointLog<Change>,
    /// The queues whose counts this transaction was noted in flight for at its pre-commit.
    entered: Vec<(i32, Entered)>,
}

impl Pending {
    /// The net change of each queue's messages (queues sorted, none twice).
    fn net_messages(&self) -> Vec<(i32, i64)> {
        let deltas = self
            .changes
            .entries()
            .iter()
            .filter_map(|change| match *change {
                Change::Messages(queue_id, delta) => Some((queue_id, delta)),
                _ => None,
            })
            .collect();
        sum_per_key(deltas, |sum, delta| *sum += delta)
    }
}

thread_local! {
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
}

/// Asks for the counts' shared memory.
///
/// # Safety
/// Call once, from _PG_init while shared_preload_libraries is processed.
pub unsafe fn request_shared_memory() {
    // SAFETY: the caller's contract is `request`'s.
    unsafe { DEPTHS.request() };
}

/// `count` messages went into the queue.
pub fn added(queue_id: i32, count: usize) {
    if count > 0 {
        note(Change::Messages(queue_id, count as i64));
    }
}

/// `count` messages left the queue.
pub fn removed(queue_id: i32, count: usize) {
    if count > 0 {
        note(Change::Messages(queue_id, -(count as i64)));
    }
}

pub fn touched(queue_id: i32) {
    note(Change::Touched(queue_id));
}

pub fn created(queue_id: i32) {
    note(Change::Created(queue_id));
}

pub fn dropped(queue_id: i32) {
    note(Change::Dropped(queue_id));
}

fn note(change: Change) {
    if !wakeup::shared_memory() {
        return;
    }
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        if pending.changes.is_empty() {
            pending.relation = message_storage();
        }
        // Changes since the innermost savepoint merge into one per queue in a row.
        if let Some(last) = pending.changes.last_since_savepoint() {
            if last.queue_id() == change.queue_id() {
                match (last, &change) {
                    (Change::Messages(_, sum), Change::Messages(_, delta)) => {
                        *sum += delta;
                        return;
                    }
                    (Change::Messages(..) | Change::Touched(_), Change::Touched(_)) => return,
                    _ => {}
                }
            }
        }
        pending.changes.push(change);
    });
}

/// The file bussig.message is stored in: TRUNCATE, and the worker's rewrite, give it a new one, and
/// with it every count starts over (counted again from the rows). 0 when there is no bussig.
fn message_storage() -> u32 {
    let table = catalog::bussig_relation(c"message");
    if table == pg_sys::InvalidOid {
        return 0;
    }
    catalog::relation_file(table)
}

fn key(relation: u32, queue_id: i32) -> Key {
    Key {
        database: crate::pg::my_database().to_u32(),
        relation,
        queue_id,
    }
}

/// Called by `pg::xact` at each transaction event.
pub fn at_transaction_end(event: pg_sys::XactEvent::Type) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PARALLEL_PRE_COMMIT
    ) {
        begin_committing();
        return;
    }
    if !matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PARALLEL_ABORT
            | XACT_EVENT_PREPARE
    ) {
        return;
    }
    let pending = PENDING.with(|pending| std::mem::take(&mut *pending.borrow_mut()));
    if pending.changes.is_empty() {
        return;
    }
    let key = |queue_id| key(pending.relation, queue_id);
    let xid = crate::pg::xact::top_transaction_id();
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            let reshapes = pending
                .changes
                .entries()
                .iter()
                .any(|change| matches!(change, Change::Created(_) | Change::Dropped(_)));
            if reshapes {
                let mut depths = DEPTHS.exclusive();
                for change in pending.changes.entries() {
                    match *change {
                        Change::Created(queue_id) => depths.created(key(queue_id)),
                        Change::Dropped(queue_id) => depths.remove(key(queue_id)),
                        Change::Messages(queue_id, delta) => depths.add(key(queue_id), xid, delta),
                        Change::Touched(queue_id) => depths.touch(key(queue_id)),
                    }
                }
                for &(queue_id, entered) in &pending.entered {
                    depths.left(key(queue_id), entered);
                }
            } else {
                // One change per queue: fewer commits for a count to judge.
                let depths = DEPTHS.share();
                for (queue_id, delta) in pending.net_messages() {
                    depths.add(key(queue_id), xid, delta);
                }
                for change in pending.changes.entries() {
                    if let Change::Touched(queue_id) = *change {
                        depths.touch(key(queue_id));
                    }
                }
                for &(queue_id, entered) in &pending.entered {
                    depths.left(key(queue_id), entered);
                }
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT if !pending.entered.is_empty() => {
            let depths = DEPTHS.share();
            for &(queue_id, entered) in &pending.entered {
                depths.left(key(queue_id), entered);
            }
        }
        // COMMIT PREPARED runs in another session, without these changes: count the queues again.
        XACT_EVENT_PREPARE => {
            let keys = pending
                .changes
                .entries()
                .iter()
                .map(|change| key(change.queue_id()));
            DEPTHS.exclusive().prepared(keys);
        }
        _ => {}
    }
}

/// Before the commit becomes visible to others: its queues' counts note it in flight, so that a count
/// whose snapshot sees it waits for its change (see `table::InFlight`).
fn begin_committing() {
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        let net = pending.net_messages();
        if net.is_empty() {
            return;
        }
        let depths = DEPTHS.share();
        let entered = net
            .into_iter()
            .map(|(queue_id, _)| (queue_id, depths.entering(key(pending.relation, queue_id))))
            .collect();
        pending.entered = entered;
    });
}

/// Called by `pg::xact` at each subtransaction event.
pub fn at_subtransaction_end(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
) {
    PENDING.with(|pending| {
        // What an aborted subtransaction changed never happened.
        pending
            .borrow_mut()
            .changes
            .at_subtransaction_end(event, subtransaction);
    });
}

// Runs in the snapshot `count` takes after the count began, not the calling statement's older one.
static COUNT_MESSAGES: Statement = Statement {
    sql: "SELECT ids.queue_id,
                 (SELECT count(*) FROM bussig.message in_order WHERE in_order.queue_id = ids.queue_id),
                 EXISTS (SELECT FROM bussig.queue q WHERE q.queue_id = ids.queue_id)
          FROM unnest($1::int[]) AS ids(queue_id)",
    args: &[pg_sys::INT4ARRAYOID],
    writes: false,
};

/// How many messages the queue holds, as this transaction sees them.
pub fn messages(client: &mut SpiClient<'_>, queue_id: i32) -> BusResult<i64> {
    let relation = message_storage();
    let key = key(relation, queue_id);
    let own = PENDING.with(|pending| {
        let pending = pending.borrow();
        let mine = pending
            .changes
            .entries()
            .iter()
            .filter(|change| change.queue_id() == queue_id);
        mine.fold(None, |sum: Option<i64>, change| match *change {
            Change::Messages(_, delta) => Some(sum.unwrap_or(0) + delta),
            _ => Some(sum.unwrap_or(0)),
        })
    });
    let shared = wakeup::shared_memory();
    if shared {
        if let Some(count) = DEPTHS.share().messages(key) {
            return Ok(count + own.unwrap_or(0));
        }
    }
    // A count is kept only when it sees exactly what has committed: not with this transaction's
    // own changes in it, nor in a snapshot taken before now.
    let keep = shared && own.is_none() && counts_in_own_snapshot();
    // Prepared first, so that few commits end while the count runs.
    plans::prepare(client, &COUNT_MESSAGES)?;
    let (generation, snapshot) = if keep {
        let mut depths = DEPTHS.exclusive();
        let snapshot = LatestSnapshot::take();
        (depths.begin_count(key, snapshot.horizon()), snapshot)
    } else {
        (None, LatestSnapshot::take())
    };
    let counts = count(client, &[queue_id], &snapshot)?;
    let count = counts.first().and_then(|&(_, count)| count);
    if let Some(generation) = generation {
        finish(key, generation, count, &snapshot, None);
    }
    Ok(count.unwrap_or(0))
}

/// Ends a count: kept unless superseded or spoiled. While transactions that began committing before
/// its snapshot have not added their changes (microseconds after they became visible), it waits for
/// them a little; past that it is not kept. Whether it was kept.
fn finish(
    key: Key,
    generation: u32,
    counted: Option<i64>,
    snapshot: &LatestSnapshot,
    settled_since: Option<u32>,
) -> bool {
    // Dropped before the count's snapshot: its slot, made again by `begin_count`, goes.
    let Some(counted) = counted else {
        DEPTHS.exclusive().remove(key);
        return false;
    };
    for _ in 0..FINISH_TRIES {
        let finished = DEPTHS.exclusive().finish_count(
            key,
            generation,
            counted,
            |xid| snapshot.saw(xid),
            settled_since,
        );
        match finished {
            Finished::Kept => return true,
            Finished::Dropped => return false,
            Finished::Busy => std::thread::sleep(FINISH_PAUSE),
        }
    }
    DEPTHS.exclusive().drop_count(key, generation);
    false
}

const FINISH_TRIES: u32 = 50;
const FINISH_PAUSE: std::time::Duration = std::time::Duration::from_micros(100);

/// Whether a count runs in the snapshot `count` takes, so that commits can be judged against it.
/// SPI reads in the active snapshot only while the transaction has written nothing (no xid): after a
/// write it takes a snapshot of its own for each statement. A transaction-long snapshot is older
/// than the count's start.
fn counts_in_own_snapshot() -> bool {
    !crate::pg::xact::snapshot_is_fixed() && crate::pg::xact::top_transaction_id() == 0
}

/// Counts of queues' messages, as `snapshot` sees them; None for a queue that is gone in it.
fn count(
    client: &mut SpiClient<'_>,
    queue_ids: &[i32],
    snapshot: &LatestSnapshot,
) -> BusResult<Vec<(i32, Option<i64>)>> {
    let rows =
        snapshot.while_active(|| plans::run(client, &COUNT_MESSAGES, &[queue_ids.to_vec().into()]));
    let mut counts = Vec::with_capacity(queue_ids.len());
    for row in rows? {
        let exists: bool = plans::filled(&row, 3, "queue exists")?;
        counts.push((
            plans::filled(&row, 1, "queue id")?,
            exists
                .then(|| plans::filled(&row, 2, "count"))
                .transpose()?,
        ));
    }
    Ok(counts)
}

static QUEUE_IDS: Statement = Statement {
    sql: "SELECT queue_id FROM bussig.queue ORDER BY queue_id",
    args: &[],
    writes: false,
};

static DATABASES: Statement = Statement {
    sql: "SELECT oid::int8 FROM pg_catalog.pg_database ORDER BY oid",
    args: &[],
    writes: false,
};

/// The worker's step: counts the queues whose count is unknown (after a restart) or in doubt (a
/// prepared transaction changed them), and forgets the queues of dropped databases and of a dropped
/// bussig. How many counts it kept.
pub fn recount(client: &mut SpiClient<'_>) -> BusResult<i64> {
    if !wakeup::shared_memory() || !counts_in_own_snapshot() {
        return Ok(0);
    }
    let relation = message_storage();
    let queue_ids: Vec<i32> = plans::first_column(client, &QUEUE_IDS, &[])?;
    let databases: Vec<u32> = plans::first_column::<i64>(client, &DATABASES, &[])?
        .into_iter()
        .map(|oid| oid as u32)
        .collect();
    // Read before looking for prepared transactions, all ahead of the counts' snapshots: a PREPARE
    // that the look misses moves it (see `Depths::finish_count`).
    let prepares = DEPTHS.share().prepares();
    let settled_since = (!crate::pg::xact::prepared_here(client)?).then_some(prepares);
    plans::prepare(client, &COUNT_MESSAGES)?;
    let uncounted = {
        let mut depths = DEPTHS.exclusive();
        let any = key(relation, 0);
        depths.forget_gone(any.database, relation, &databases);
        depths.uncounted(any.database, relation, &queue_ids)
    };
    // A few queues at a time, each few in a snapshot of its own, so that counts that users' looks
    // start keep places too; for a while only, so that the worker's other steps go on.
    let budget = std::time::Instant::now() + RECOUNT_BUDGET;
    let mut kept = 0;
    for few in uncounted.chunks(table::COUNTS_AT_ONCE / 2) {
        if std::time::Instant::now() >= budget {
            break;
        }
        kept += count_and_keep(client, relation, few, settled_since)?;
    }
    Ok(kept)
}

/// How long one call of `recount` counts queues at most.
const RECOUNT_BUDGET: std::time::Duration = std::time::Duration::from_millis(200);

/// Counts `queue_ids` in one snapshot and keeps the counts: how many were kept.
fn count_and_keep(
    client: &mut SpiClient<'_>,
    relation: u32,
    queue_ids: &[i32],
    settled_since: Option<u32>,
) -> BusResult<i64> {
    let (started, snapshot): (Vec<(i32, u32)>, LatestSnapshot) = {
        let mut depths = DEPTHS.exclusive();
        let snapshot = LatestSnapshot::take();
        let horizon = snapshot.horizon();
        let started = queue_ids
            .iter()
            .filter_map(|&queue_id| {
                let generation = depths.begin_count(key(relation, queue_id), horizon)?;
                Some((queue_id, generation))
            })
            .collect();
        (started, snapshot)
    };
    if started.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i32> = started.iter().map(|&(queue_id, _)| queue_id).collect();
    let counts = count(client, &ids, &snapshot)?;
    let mut kept = 0;
    for &(queue_id, generation) in &started {
        let Some(&(_, count)) = counts.iter().find(|&&(counted, _)| counted == queue_id) else {
            continue;
        };
        kept += i64::from(finish(
            key(relation, queue_id),
            generation,
            count,
            &snapshot,
            settled_since,
        ));
    }
    Ok(kept)
}

/// Queues that commits changed since the worker last asked and that hold at most `most` messages.
pub fn take_touched(most: i64) -> Vec<i32> {
    if !wakeup::shared_memory() {
        return Vec::new();
    }
    let any = key(message_storage(), 0);
    DEPTHS
        .share()
        .take_touched(any.database, any.relation, most)
}
