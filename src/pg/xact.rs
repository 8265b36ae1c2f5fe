//! The transaction callbacks, registered once: what a module noted during a transaction is applied
//! at its commit or dropped at its abort. Order matters: depth counts are applied before waiting
//! readers wake, so a reader that looks at the depth sees what woke it, and a commit's lapsed locks
//! (`read_position`) are noted before `wakeup` takes what the commit made readable.
use pgrx::pg_sys::panic::CaughtError;
use pgrx::spi::SpiClient;
use pgrx::{pg_guard, pg_sys, PgSqlErrorCode};

use super::wakeup;
use crate::depth;
use crate::error::BusResult;
use crate::message::read_position;

pub(super) fn register() {
    // SAFETY: called from _PG_init, once per process; the callbacks are plain functions that live as
    // long as the library (it is never unloaded), and take effect from the next transaction event.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_transaction_end), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subtransaction_end), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_transaction_end(
    event: pg_sys::XactEvent::Type,
    _argument: *mut std::ffi::c_void,
) {
    read_position::at_transaction_end(event);
    depth::at_transaction_end(event);
    wakeup::at_transaction_end(event);
    super::arrivals::at_transaction_end(event);
    crate::access::held::at_transaction_end(event);
    replayable_at_transaction_event(event);
}

/// What a transaction wrote so far, as far as its commit's flush goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Written {
    /// No replayable write yet.
    Nothing,
    /// Only replayable writes, the last of them ending at this place in the WAL.
    ReplayableThrough(pg_sys::XLogRecPtr),
    /// Something else.
    Other,
}

thread_local! {
    static WRITTEN: std::cell::Cell<Written> = const { std::cell::Cell::new(Written::Nothing) };
    /// The synchronous_commit a commit of replayable writes only set aside, to put back after it.
    static SET_ASIDE: std::cell::Cell<Option<i32>> = const { std::cell::Cell::new(None) };
}

/// Runs `write`, whose loss in a crash only makes work be done again (a consumer group's position:
/// its records are read again, at least once as always). When all a transaction writes is such
/// writes, its commit does not wait for the WAL flush (asynchronous commit, for that transaction
/// only): a crash may take back the last fraction of a second of them. A transaction that also
/// writes anything else, before or after, commits as the caller's settings say.
pub fn replayable_write<T>(write: impl FnOnce() -> BusResult<T>) -> BusResult<T> {
    // SAFETY: plain reads of this backend's WAL position, which PostgreSQL keeps per transaction.
    let before = unsafe { pg_sys::XactLastRecEnd };
    let done = write()?;
    // SAFETY: as above.
    let after = unsafe { pg_sys::XactLastRecEnd };
    WRITTEN.with(|written| {
        let now = match written.get() {
            _ if after == before => written.get(),
            Written::Nothing if before == 0 => Written::ReplayableThrough(after),
            Written::ReplayableThrough(end) if before == end => Written::ReplayableThrough(after),
            _ => Written::Other,
        };
        written.set(now);
    });
    Ok(done)
}

fn replayable_at_transaction_event(event: pg_sys::XactEvent::Type) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => {
            // SAFETY: plain reads and a write of backend-local settings; the commit record, written
            // after this callback, reads synchronous_commit, and the end of the transaction puts it
            // back.
            unsafe {
                let only_replayable = matches!(WRITTEN.with(|w| w.get()),
                    Written::ReplayableThrough(end) if end == pg_sys::XactLastRecEnd);
                if only_replayable
                    && pg_sys::synchronous_commit
                        > pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_OFF as i32
                {
                    SET_ASIDE.with(|aside| aside.set(Some(pg_sys::synchronous_commit)));
                    pg_sys::synchronous_commit =
                        pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_OFF as i32;
                }
            }
        }
        XACT_EVENT_COMMIT
        | XACT_EVENT_ABORT
        | XACT_EVENT_PREPARE
        | XACT_EVENT_PARALLEL_COMMIT
        | XACT_EVENT_PARALLEL_ABORT => {
            WRITTEN.with(|written| written.set(Written::Nothing));
            if let Some(level) = SET_ASIDE.with(|aside| aside.take()) {
                // SAFETY: puts back the value set aside at PRE_COMMIT.
                unsafe { pg_sys::synchronous_commit = level };
            }
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subtransaction_end(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _argument: *mut std::ffi::c_void,
) {
    read_position::at_subtransaction_end(event);
    depth::at_subtransaction_end(event, subtransaction);
    wakeup::at_subtransaction_end(event, subtransaction);
    crate::access::held::at_subtransaction_end(event, subtransaction);
}

/// Whether this transaction reads with one snapshot throughout (REPEATABLE READ or SERIALIZABLE):
/// no statement in it can see what others commit later.
pub fn snapshot_is_fixed() -> bool {
    // SAFETY: a plain read of a backend-local setting.
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

/// Whether the caller runs in a transaction block (BEGIN ... COMMIT), which goes on after the current
/// statement, rather than in a statement's own transaction.
pub fn in_transaction_block() -> bool {
    // SAFETY: a plain read of the backend's transaction state.
    unsafe { pg_sys::IsTransactionBlock() }
}

/// This transaction's top-level id, or 0 when it has none (it wrote nothing).
pub fn top_transaction_id() -> u32 {
    // SAFETY: reads the transaction's state, which stays set until its end callbacks have run.
    unsafe { pg_sys::GetTopTransactionIdIfAny() }.into_inner()
}

/// The id of the running subtransaction (of the transaction, outside any), or else of the
/// transaction; 0 when neither has one.
pub fn current_transaction_id() -> u32 {
    // SAFETY: reads the transaction's state, as above.
    let current = unsafe { pg_sys::GetCurrentTransactionIdIfAny() }.into_inner();
    if current != 0 {
        current
    } else {
        top_transaction_id()
    }
}

// Not MVCC: the view reads the prepared transactions of the moment.
static PREPARED_HERE: crate::plans::Statement = crate::plans::Statement {
    sql: "SELECT EXISTS (SELECT FROM pg_catalog.pg_prepared_xacts WHERE database = current_database())",
    args: &[],
    // Read-only, so that it takes no transaction id: the depth recount that asks must have none
    // (`depth::counts_in_own_snapshot`). The view reads shared memory, not a snapshot.
    writes: false,
};

/// Whether a transaction of this database is prepared, waiting for COMMIT or ROLLBACK PREPARED.
pub fn prepared_here(client: &mut SpiClient<'_>) -> BusResult<bool> {
    Ok(crate::plans::first_value::<bool>(client, &PREPARED_HERE, &[])?.unwrap_or(true))
}

/// Whether transaction `xid` (not this one) committed, or None while it runs (or is this one).
pub fn committed(xid: u32) -> Option<bool> {
    if is_this_transaction(xid) {
        return None;
    }
    let xid = pg_sys::TransactionId::from(xid);
    // SAFETY: look-ups in the proc array and the commit log, for a transaction id a caller saw
    // recently (the log keeps far more than the ids since).
    unsafe {
        if pg_sys::TransactionIdIsInProgress(xid) {
            None
        } else {
            Some(pg_sys::TransactionIdDidCommit(xid))
        }
    }
}

/// Whether `xid` is this transaction or one of its subtransactions.
pub fn is_this_transaction(xid: u32) -> bool {
    // SAFETY: a look-up in this backend's own transaction state.
    unsafe { pg_sys::TransactionIdIsCurrentTransactionId(xid.into()) }
}

/// Runs `work` in a subtransaction of its own, kept when `keep` says so of what it returned and rolled
/// back otherwise, which also lets go of the rows it locked. An error inside rolls it back too, and
/// goes on up. What `work` got from SPI must not outlive it: a rollback frees it.
pub fn in_subtransaction<T>(
    work: impl FnOnce() -> BusResult<T>,
    keep: impl FnOnce(&T) -> bool,
) -> BusResult<T> {
    subtransaction(work, keep).unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// `in_subtransaction`, with an error inside given back as the panic that carries it.
fn subtransaction<T>(
    work: impl FnOnce() -> BusResult<T>,
    keep: impl FnOnce(&T) -> bool,
) -> std::thread::Result<BusResult<T>> {
    // SAFETY: plain reads of the backend's current memory context and resource owner, to restore
    // after the subtransaction ends, as PostgreSQL's procedural languages do.
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    // SAFETY: called within a transaction (every SQL function is); the subtransaction is ended below
    // on every path out, including an unwinding error.
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    let kept = matches!(&outcome, Ok(Ok(value)) if keep(value));
    // SAFETY: the subtransaction begun above is the current one: `work` ends every subtransaction it
    // begins (SPI and PL/pgSQL do), and an error caught above has had its state copied and flushed.
    unsafe {
        if kept {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    }
    outcome
}

/// Runs `work`, which waits for a lock, giving up after `wait` (or the caller's lock_timeout, when
/// shorter), or at once when the wait would deadlock: None when it gave up (rolled back in a
/// subtransaction of its own, so it holds nothing), else what it returned, its locks kept. Other
/// errors go on up. A deadlock comes at once, not after deadlock_timeout, when this transaction
/// holds the object in a weaker mode and another that holds it too already waits for it: each
/// would wait for the other (PostgreSQL's lock queue sees it before sleeping). The caller's lock_timeout is back as it was after (a GUC nest level of its own,
/// as `identity::Pins` pins settings).
pub fn waiting_at_most<T>(
    client: &mut SpiClient<'_>,
    wait: std::time::Duration,
    work: impl FnOnce(&mut SpiClient<'_>) -> BusResult<T>,
) -> BusResult<Option<T>> {
    // A caller's shorter lock_timeout stands.
    // SAFETY: a plain read of a backend-local setting.
    let callers = unsafe { pg_sys::LockTimeout };
    let mut millis = wait.as_millis().max(1);
    if callers > 0 {
        millis = millis.min(callers as u128);
    }
    let limit =
        std::ffi::CString::new(format!("{millis}ms")).expect("a number and a unit have no NUL");
    // SAFETY: inside a transaction; the level is closed below, or by the abort of an error.
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    super::gucs::set(c"lock_timeout", &limit, pg_sys::GucAction::GUC_ACTION_SAVE);
    let outcome = subtransaction(|| work(&mut *client), |_| true);
    // SAFETY: the level opened above in this transaction, closed once.
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    match outcome {
        Ok(done) => done.map(Some),
        Err(panic) => match panic.downcast_ref::<CaughtError>() {
            Some(CaughtError::PostgresError(report))
                if matches!(
                    report.sql_error_code(),
                    PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE
                        | PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED
                ) =>
            {
                Ok(None)
            }
            _ => std::panic::resume_unwind(panic),
        },
    }
}

/// What a module notes during a transaction, with a mark where each open subtransaction began: what
/// a subtransaction noted is taken out when it aborts (ROLLBACK TO SAVEPOINT, a PL/pgSQL exception).
pub struct SavepointLog<T> {
    entries: Vec<T>,
    marks: Vec<(pg_sys::SubTransactionId, usize)>,
}

impl<T> Default for SavepointLog<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> SavepointLog<T> {
    pub const fn new() -> Self {
        SavepointLog {
            entries: Vec::new(),
            marks: Vec::new(),
        }
    }

    pub fn entries(&self) -> &[T] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn push(&mut self, entry: T) {
        self.entries.push(entry);
    }

    /// The last entry when the innermost open subtransaction noted it: only such an entry may absorb
    /// a new one, or an abort would take out what an outer level noted.
    pub fn last_since_savepoint(&mut self) -> Option<&mut T> {
        let floor = self.marks.last().map_or(0, |&(_, len)| len);
        if self.entries.len() > floor {
            self.entries.last_mut()
        } else {
            None
        }
    }

    /// Everything noted, for the transaction's end; the log starts empty again.
    pub fn take(&mut self) -> Vec<T> {
        self.marks.clear();
        std::mem::take(&mut self.entries)
    }

    /// Follows a subtransaction event; returns what an aborted subtransaction had noted.
    pub fn at_subtransaction_end(
        &mut self,
        event: pg_sys::SubXactEvent::Type,
        subtransaction: pg_sys::SubTransactionId,
    ) -> Vec<T> {
        use pg_sys::SubXactEvent::*;
        match event {
            SUBXACT_EVENT_START_SUB => self.marks.push((subtransaction, self.entries.len())),
            SUBXACT_EVENT_COMMIT_SUB | SUBXACT_EVENT_ABORT_SUB => {
                let Some(at) = self.marks.iter().rposition(|&(id, _)| id == subtransaction) else {
                    return Vec::new();
                };
                let (_, len) = self.marks[at];
                self.marks.truncate(at);
                if event == SUBXACT_EVENT_ABORT_SUB {
                    return self.entries.split_off(len.min(self.entries.len()));
                }
            }
            _ => {}
        }
        Vec::new()
    }
}

/// Adds up the values noted for each key (a queue, a group): keys sorted, none twice.
pub fn sum_per_key<K: Ord, V>(mut noted: Vec<(K, V)>, add: impl Fn(&mut V, V)) -> Vec<(K, V)> {
    noted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut sums: Vec<(K, V)> = Vec::with_capacity(noted.len());
    for (key, value) in noted {
        match sums.last_mut() {
            Some((last, sum)) if *last == key => add(sum, value),
            _ => sums.push((key, value)),
        }
    }
    sums
}
