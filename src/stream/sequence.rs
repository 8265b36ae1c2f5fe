//! Numbering: records are appended without a seq; whoever reads a partition first gives the committed
//! ones the next numbers, in append order, under the partition's row lock (as PgQ's ticker closes a
//! batch of what committed). So numbers follow the order records become readable: one committing
//! later gets a higher seq than anything a reader could see before, a rollback leaves no gap, and an
//! open appending transaction holds back nobody (its records are not visible, so not numbered yet).
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use super::Stream;
use crate::error::BusResult;
use crate::pg::xact;
use crate::plans::{self, Statement};

// SKIP LOCKED: while another transaction numbers the partition, read what is numbered already.
static LOCK_PARTITION: Statement = Statement {
    sql: "SELECT head_seq FROM bussig.stream_partition WHERE stream_id = $1 AND partition = $2
          FOR UPDATE SKIP LOCKED",
    args: &[pg_sys::INT4OID, pg_sys::INT4OID],
    writes: true,
};

// Retention's, which waits for a reader that is numbering the partition (a bounded wait).
static WAIT_FOR_PARTITION: Statement = Statement {
    sql: "SELECT head_seq FROM bussig.stream_partition WHERE stream_id = $1 AND partition = $2 FOR UPDATE",
    args: &[pg_sys::INT4OID, pg_sys::INT4OID],
    writes: true,
};

static SET_HEAD: Statement = Statement {
    sql: "UPDATE bussig.stream_partition SET head_seq = $3 WHERE stream_id = $1 AND partition = $2",
    args: &[pg_sys::INT4OID, pg_sys::INT4OID, pg_sys::INT8OID],
    writes: true,
};

/// Records waiting for a number, as many as a single pass numbers: a flood is numbered over several.
const PASS: i64 = 100_000;

// The last record id drawn (NULL before the first): read before the appenders are counted.
static LAST_RECORD_ID: Statement = Statement {
    sql: "SELECT pg_catalog.pg_sequence_last_value('bussig.stream_record_id_seq')",
    args: &[],
    writes: true,
};

/// The statement that numbers a partition's committed records after `$2`, among those with ids past
/// `$3` (`floors`): its own, since it names the stream's table. Run after the lock was taken, so it sees every record whose number the
/// previous holder committed, and every record committed before. The rows are found again by their
/// place (segment table and ctid): a join on record_id would be planned once, while the table was
/// empty, as a nested loop over every waiting record for each (minutes for 50,000 of them).
fn numbering(stream: &Stream) -> String {
    let table = stream.table();
    format!(
        "WITH waiting AS (
             SELECT w.tableoid AS segment_table, w.ctid AS place,
                    $2 + row_number() OVER (ORDER BY w.record_id) AS seq
             FROM (SELECT tableoid, ctid, record_id FROM {table}
                   WHERE partition = $1 AND seq IS NULL AND record_id > $3
                   ORDER BY record_id LIMIT {PASS}) w
         )
         UPDATE {table} r SET seq = waiting.seq FROM waiting
         WHERE r.tableoid = waiting.segment_table AND r.ctid = waiting.place
         RETURNING r.seq"
    )
}

/// The stream's arrival count a backend noted before it looked at a partition, and when it looked.
type Looked = (u64, Instant);

thread_local! {
    /// Partitions (by stream id, then partition) this backend found with nothing to number, with the
    /// stream's arrival count (`pg::arrivals`) noted before and when: while the count stays, no append
    /// committed since, and reads need not look again. An append of this backend's transaction
    /// forgets its stream, so that its own reads number its records as before.
    static NOTHING_NEW: RefCell<HashMap<i32, HashMap<i32, Looked>>> = RefCell::new(HashMap::new());
}

thread_local! {
    /// Streams this backend numbered records of, with the transaction that did: while it runs, a
    /// pass that finds nothing may still see its own numbers, which a rollback takes back.
    static NUMBERED_IN: RefCell<HashMap<i32, u32>> = RefCell::new(HashMap::new());
}

/// Whether the running transaction numbered records of the stream (see `NUMBERED_IN`).
fn numbered_in_this_transaction(stream_id: i32) -> bool {
    let this = xact::top_transaction_id();
    this != 0 && NUMBERED_IN.with(|numbered| numbered.borrow().get(&stream_id) == Some(&this))
}

/// How long a backend trusts that a partition has nothing new. COMMIT PREPARED counts no arrival (the
/// transaction's noted arrivals ended with its PREPARE): its records are numbered once this has passed.
const NOTHING_NEW_FOR: Duration = Duration::from_secs(1);

/// Streams remembered at most; past that the backend starts over.
const NOTHING_NEW_LIMIT: usize = 1_000;

/// `number`, unless no append to the stream committed since this backend last found the partition
/// with nothing to number: the reads' way, which spares them a statement and an index probe.
pub fn number_new(client: &mut SpiClient<'_>, stream: &Stream, partition: i32) -> BusResult<()> {
    // Without shared memory there is no count; with a snapshot older than the count, what the count
    // says has committed may be out of this transaction's sight.
    if !crate::pg::wakeup::shared_memory() || xact::snapshot_is_fixed() {
        number(client, stream, partition)?;
        return Ok(());
    }
    let stream_id = stream.stream_id;
    // Noted before the numbering's snapshots are taken, as a waiting reader notes it.
    let seen = crate::pg::arrivals::seen(super::wake_key(stream.stream_id));
    let known_empty = NOTHING_NEW.with(|known| {
        known
            .borrow()
            .get(&stream_id)
            .and_then(|partitions| partitions.get(&partition))
            .is_some_and(|&(count, since)| count == seen && since.elapsed() < NOTHING_NEW_FOR)
    });
    if known_empty {
        return Ok(());
    }
    // Only a pass that numbered nothing, in a transaction that numbered nothing of this stream, is
    // remembered: a rollback takes nothing back that it saw.
    let looked = Instant::now();
    if let Some((_, 0)) = number_counting(client, stream, partition)? {
        if numbered_in_this_transaction(stream_id) {
            return Ok(());
        }
        NOTHING_NEW.with(|known| {
            let mut known = known.borrow_mut();
            if known.len() >= NOTHING_NEW_LIMIT {
                known.clear();
            }
            known
                .entry(stream_id)
                .or_default()
                .insert(partition, (seen, looked));
        });
    }
    Ok(())
}

/// This transaction appended to the stream: its reads number again.
pub fn forget(stream_id: i32) {
    NOTHING_NEW.with(|known| known.borrow_mut().remove(&stream_id));
}

/// Numbers the partition's committed records; its head (last seq) after that, or None when another
/// transaction is numbering it right now.
pub fn number(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    partition: i32,
) -> BusResult<Option<i64>> {
    Ok(number_counting(client, stream, partition)?.map(|(head, _)| head))
}

/// `number`, with how many records it numbered.
fn number_counting(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    partition: i32,
) -> BusResult<Option<(i64, i64)>> {
    let args = [stream.stream_id.into(), partition.into()];
    let Some(head) = plans::first_value::<i64>(client, &LOCK_PARTITION, &args)? else {
        return Ok(None);
    };
    let place = (stream.stream_id, partition);
    let floor = floors::current(crate::pg::invalidation::generation(client)?, place);
    // Before the numbering's snapshot, which must be new: one taken earlier may miss records that
    // committed since, which the floor would then pass over for good.
    let all_ended_through = if floors::due(place) && !xact::snapshot_is_fixed() {
        all_ended_through(client, stream)?
    } else {
        None
    };
    let sql = numbering(stream);
    let numbered = plans::run_text(
        client,
        &sql,
        &[pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::INT8OID],
        true,
        &[partition.into(), head.into(), floor.into()],
    )?;
    let count = numbered.len() as i64;
    if let Some(through) = all_ended_through.filter(|_| count < PASS) {
        // Numbers this transaction gave (now or before) are taken back if it rolls back: the floor
        // holds once it commits. Filed under the subtransaction numbering now, which a long poll
        // that found nothing (or a caller's savepoint) rolls back while the transaction commits.
        let numbering_now = count > 0 || numbered_in_this_transaction(stream.stream_id);
        let this = xact::current_transaction_id();
        floors::propose(place, through, if numbering_now { this } else { 0 });
    }
    if count == 0 {
        return Ok(Some((head, 0)));
    }
    NUMBERED_IN.with(|numbered| {
        let mut numbered = numbered.borrow_mut();
        if numbered.len() >= NOTHING_NEW_LIMIT {
            numbered.clear();
        }
        numbered.insert(stream.stream_id, xact::top_transaction_id());
    });
    // Readers of other groups that found this partition being numbered, and read on without it,
    // are woken when these numbers commit, as an append's commit wakes them.
    crate::pg::wakeup::note_readable(super::wake_key(stream.stream_id), u32::MAX);
    let new_head = head + count;
    plans::run(
        client,
        &SET_HEAD,
        &[stream.stream_id.into(), partition.into(), new_head.into()],
    )?;
    Ok(Some((new_head, count)))
}

/// The last record id drawn, when every transaction that drew one up to it has ended (committed or
/// rolled back for good): the id is read first, then no appender is counted, so a record with an id
/// up to it that commits is visible to any snapshot taken after. None otherwise, and while a prepared
/// transaction (which may hold appends) exists.
fn all_ended_through(client: &mut SpiClient<'_>, stream: &Stream) -> BusResult<Option<i64>> {
    let Some(last) = plans::first_value::<i64>(client, &LAST_RECORD_ID, &[])? else {
        return Ok(None);
    };
    if !crate::pg::arrivals::none_appending(super::wake_key(stream.stream_id))
        // A prepared transaction's appends are counted no longer, nor after a restart.
        || xact::prepared_here(client)?
    {
        return Ok(None);
    }
    Ok(Some(last))
}

/// Per partition, the record id up to which every record is numbered or was rolled back: a numbering
/// pass looks only past it, so that the index entries of records numbered while a snapshot is held
/// (their unnumbered versions, which nothing can remove then) are not walked again by every pass.
/// Kept by each backend for the partitions it numbers, and learnt at most every `EVERY`.
mod floors {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use crate::pg::xact;

    const EVERY: Duration = Duration::from_millis(100);
    const LIMIT: usize = 10_000;

    struct Floor {
        held: i64,
        /// A floor that holds once transaction `.1` commits.
        proposed: Option<(i64, u32)>,
        learnt_at: Instant,
    }

    /// Each partition's floor, by (stream id, partition).
    type Floors = HashMap<(i32, i32), Floor>;

    thread_local! {
        /// By the invalidation generation they were learnt in: a stream dropped and made again
        /// (its id too, after DROP EXTENSION) starts over.
        static FLOORS: RefCell<(u64, Floors)> = RefCell::new((0, HashMap::new()));
    }

    /// The floor of a partition (stream id, partition); a proposed one is taken on once its
    /// transaction committed, and dropped if it rolled back.
    pub fn current(generation: u64, place: (i32, i32)) -> i64 {
        FLOORS.with(|floors| {
            let (learnt_in, floors) = &mut *floors.borrow_mut();
            if *learnt_in != generation {
                *learnt_in = generation;
                floors.clear();
            }
            let Some(floor) = floors.get_mut(&place) else {
                return 0;
            };
            if let Some((proposed, xid)) = floor.proposed {
                match xact::committed(xid) {
                    Some(true) => {
                        floor.held = floor.held.max(proposed);
                        floor.proposed = None;
                    }
                    Some(false) => floor.proposed = None,
                    None => {}
                }
            }
            floor.held
        })
    }

    /// Whether it is time to learn the partition's floor again.
    pub fn due(place: (i32, i32)) -> bool {
        FLOORS.with(|floors| {
            floors
                .borrow()
                .1
                .get(&place)
                .is_none_or(|floor| floor.learnt_at.elapsed() >= EVERY)
        })
    }

    /// Every record of the partition with an id up to `through` is numbered or rolled back, once
    /// transaction `xid` commits (at once for 0).
    pub fn propose(place: (i32, i32), through: i64, xid: u32) {
        FLOORS.with(|floors| {
            let floors = &mut floors.borrow_mut().1;
            if floors.len() >= LIMIT && !floors.contains_key(&place) {
                floors.clear();
            }
            let floor = floors.entry(place).or_insert(Floor {
                held: 0,
                proposed: None,
                learnt_at: Instant::now(),
            });
            floor.learnt_at = Instant::now();
            if xid == 0 {
                floor.held = floor.held.max(through);
            } else {
                floor.proposed = Some((through, xid));
            }
        })
    }
}

/// Numbers every partition of the stream (those another transaction is numbering are left to it):
/// whether this transaction now holds every partition's row lock.
pub fn number_all(client: &mut SpiClient<'_>, stream: &Stream) -> BusResult<bool> {
    let mut all = true;
    for partition in 0..stream.partitions {
        all &= number(client, stream, partition)?.is_some();
    }
    Ok(all)
}

/// Numbers every partition of the stream, waiting for the rows of those a reader is numbering, up to
/// `wait` in all: whether this transaction now holds every partition's row lock. Retention's way: a
/// member that reads all the time numbers some partition most of the time (the more so while a held
/// snapshot slows numbering), and a step that skipped every busy row would seldom find them all
/// free. One budget for the stream, not one per partition, so that a stream of many busy partitions
/// holds up the worker's round no longer. Waiting cannot deadlock: readers never wait for a
/// partition's row (SKIP LOCKED).
pub fn number_all_waiting(
    client: &mut SpiClient<'_>,
    stream: &Stream,
    wait: Duration,
) -> BusResult<bool> {
    let deadline = Instant::now() + wait;
    for partition in 0..stream.partitions {
        if number(client, stream, partition)?.is_some() {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let args = [stream.stream_id.into(), partition.into()];
        let waited = xact::waiting_at_most(client, left, |client| {
            Ok(plans::first_value::<i64>(
                client,
                &WAIT_FOR_PARTITION,
                &args,
            )?)
        })?;
        // Held now: numbering takes its own lock at once.
        if waited.is_none() || number(client, stream, partition)?.is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}
