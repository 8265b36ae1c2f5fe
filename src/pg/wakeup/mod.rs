//! Wakes readers waiting in `read(wait => ...)`, and the database's worker, when a transaction that
//! made messages ready commits. Waiters register their latch in shared memory; writers note the
//! queues they touched and how many messages, and a commit hook sets the latches of as many waiters
//! as those messages need. No LISTEN, no polling loop:
//! this works through transaction-pooling proxies and reacts within milliseconds.
//!
//! The NOTIFY of a queue created with `notify => true` is sent by the database's worker, right after
//! the commit that made messages ready: PostgreSQL serialises every committing transaction that
//! notifies (a cluster-wide lock held until its commit is flushed), which would serialise the
//! senders' commits. Where no worker runs, the sending transaction notifies itself.
//!
//! Without `shared_preload_libraries = 'bussig'` there is no shared memory: waiting readers then
//! poll on a short timeout instead.
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use pgrx::{pg_guard, pg_shmem_init, pg_sys, IntoDatum, PGRXSharedMemory, PgAtomic, PgLwLock};

use super::arrivals;
use super::xact::{sum_per_key, SavepointLog};

mod waiting;
pub use waiting::Waiting;

/// Readers that can wait at once in the whole cluster; more wait by polling.
const WAITER_SLOTS: usize = 1024;
/// Databases whose worker can be woken at once.
const WORKER_SLOTS: usize = 64;
/// How often a reader re-checks when it cannot be woken (no preload, or no free slot).
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Queues a worker keeps to notify; past that it notifies every queue that asked for it.
const PENDING_NOTIFIES: usize = 32;

#[derive(Clone, Copy, Default)]
struct Sleeper {
    pid: i32,
    database: u32,
    queue_id: i32,
    latch: usize,
    /// A reader's: how many messages it takes at most.
    wants: u32,
    /// A reader's: a commit woke it for its messages, which it has not read yet.
    woken: bool,
    /// A reader's: the queue's arrival count after the commit that woke it.
    woken_at: u64,
    /// A reader's: while it was woken, another commit passed it by, counting on its next read.
    passed_by: bool,
    /// A reader's: the queue's arrival count after the last commit that passed it by.
    passed_at: u64,
    /// A worker's errands, set by committing transactions.
    errands: Errands,
}

/// What commits asked of a database's worker since it last looked.
#[derive(Clone, Copy, Default)]
pub struct Errands {
    /// A fan-out is waiting.
    pub fanout: bool,
    /// Queues to NOTIFY (the first `notify_count`), or all of them when it overflowed.
    notify_count: usize,
    notify: [i32; PENDING_NOTIFIES],
    pub notify_all: bool,
}

impl Errands {
    /// Only a fan-out.
    pub fn fan_out() -> Errands {
        Errands {
            fanout: true,
            ..Errands::default()
        }
    }

    pub fn notify(&self) -> &[i32] {
        &self.notify[..self.notify_count]
    }

    fn add_notify(&mut self, queue_id: i32) {
        if self.notify_all || self.notify().contains(&queue_id) {
            return;
        }
        if self.notify_count == PENDING_NOTIFIES {
            self.notify_all = true;
            return;
        }
        self.notify[self.notify_count] = queue_id;
        self.notify_count += 1;
    }
}

#[derive(Clone, Copy)]
pub struct Sleepers {
    readers: [Sleeper; WAITER_SLOTS],
    workers: [Sleeper; WORKER_SLOTS],
}

impl Default for Sleepers {
    fn default() -> Self {
        Sleepers {
            readers: [Sleeper::default(); WAITER_SLOTS],
            workers: [Sleeper::default(); WORKER_SLOTS],
        }
    }
}

// SAFETY: plain integers and flags at fixed places, no pointers into one process's memory (a latch
// is an address in shared memory, the same in every process), behind the LWLock.
unsafe impl PGRXSharedMemory for Sleepers {}

// SAFETY: the names are bussig's own, unused by anything else in the server.
static SLEEPERS: PgLwLock<Sleepers> = unsafe { PgLwLock::new(c"bussig_sleepers") };
/// Readers registered right now: lets a commit skip the lock when nobody waits.
// SAFETY: as above.
static READERS_WAITING: PgAtomic<AtomicU32> = unsafe { PgAtomic::new(c"bussig_readers_waiting") };
/// Set in the postmaster when preloaded; forked processes inherit it.
static SHARED_MEMORY: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Queues this transaction made messages ready in (or freed slots of), and how many.
    static READY: RefCell<SavepointLog<(i32, u32)>> = const { RefCell::new(SavepointLog::new()) };
    /// Queues this transaction put messages in, ready or not: their read positions move back at
    /// commit. (A subtransaction's rolled back with it move them back all the same: harmless.)
    static PUT: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
    /// Queues this transaction locked messages of by reading them, and how many: its abort makes
    /// them ready again.
    static LOCKED: RefCell<SavepointLog<(i32, u32)>> = const { RefCell::new(SavepointLog::new()) };
    /// Queues (id, name) to NOTIFY when this transaction commits: by the worker, or by the
    /// transaction itself where no worker serves the database.
    static NOTIFY_AT_COMMIT: RefCell<Vec<(i32, String)>> = const { RefCell::new(Vec::new()) };
    /// Set in bussig's own background workers, which notify in their own transactions.
    static IN_WORKER: Cell<bool> = const { Cell::new(false) };
    /// Whether this transaction handed a fan-out to the worker.
    static FANOUT: Cell<bool> = const { Cell::new(false) };
    /// The earliest ready time of a message this transaction made ready, when it is before the
    /// transaction's start (a fan-out's messages keep their publish's).
    static EARLIEST_READY: Cell<Option<pg_sys::TimestampTz>> = const { Cell::new(None) };
    /// Whether this transaction created the extension: the launcher starts a worker at commit.
    static WAKE_LAUNCHER: Cell<bool> = const { Cell::new(false) };
    static EXIT_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Asks for the waiting readers' shared memory; without the preload there is none, and waiting
/// readers poll.
///
/// # Safety
/// Call once, from _PG_init while shared_preload_libraries is processed: a second call would chain
/// the shared memory hooks to themselves.
pub(super) unsafe fn request_shared_memory() {
    pg_shmem_init!(SLEEPERS);
    pg_shmem_init!(READERS_WAITING);
    SHARED_MEMORY.store(true, Ordering::Relaxed);
}

/// Frees this process's slots when it exits without unwinding (FATAL, e.g. pg_terminate_backend).
/// Registered in the process itself: forked children drop the exit callbacks of the postmaster.
fn ensure_exit_hook() {
    if !EXIT_HOOK.with(|registered| registered.replace(true)) {
        // SAFETY: registered once per process; the callback is a plain function that lives as long
        // as the library.
        unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0)) };
    }
}

pub fn shared_memory() -> bool {
    SHARED_MEMORY.load(Ordering::Relaxed)
}

/// `count` messages became ready (or will, delayed) in `queue_id`: as many of its waiting readers as
/// can take them are woken when this transaction commits, after the queue's read position moved back.
pub fn note_ready(queue_id: i32, count: u32) {
    PUT.with(|put| {
        let mut put = put.borrow_mut();
        if put.last() != Some(&queue_id) {
            put.push(queue_id);
        }
    });
    note_readable(queue_id, count);
}

/// `count` more messages of `queue_id` may be read, none of them put behind its read position (slots
/// of a cap freed; a stream's records, whose readers keep positions of their own): as many of its
/// waiting readers as can take them are woken at commit.
pub fn note_readable(queue_id: i32, count: u32) {
    READY.with(|ready| {
        let mut ready = ready.borrow_mut();
        match ready.last_since_savepoint() {
            Some((last, noted)) if *last == queue_id => *noted = noted.saturating_add(count),
            _ => ready.push((queue_id, count)),
        }
    });
}

/// This transaction locked `count` messages of `queue_id` by reading them: should it abort, they are
/// ready again, and waiting readers are woken for them.
pub fn note_locked(queue_id: i32, count: u32) {
    if count > 0 && shared_memory() {
        LOCKED.with(|locked| locked.borrow_mut().push((queue_id, count)));
    }
}

/// Messages arrived in this queue: its waiting readers are woken at commit (a delayed message too,
/// so that they sleep only until it becomes ready), and when they are ready now and the queue asked
/// for it, it gets its NOTIFY: from the worker after the commit, or with the commit where no worker
/// serves this database.
pub fn announce(queue_id: i32, queue_name: &str, notify: bool, ready_now: bool, count: u32) {
    note_ready(queue_id, count);
    if !(notify && ready_now) {
        return;
    }
    if !shared_memory() || IN_WORKER.with(Cell::get) {
        send_notify(queue_name);
        return;
    }
    NOTIFY_AT_COMMIT.with(|queues| {
        let mut queues = queues.borrow_mut();
        if !queues.iter().any(|(id, _)| *id == queue_id) {
            queues.push((queue_id, queue_name.to_string()));
        }
    });
}

/// One NOTIFY bussig_<queue> at commit: PostgreSQL folds repeats within a transaction into one.
fn send_notify(queue_name: &str) {
    let channel = format!("bussig_{queue_name}");
    // SAFETY: pg_notify takes two text datums, made from Rust strings that live through the call.
    unsafe {
        pgrx::direct_function_call::<()>(
            pg_sys::pg_notify,
            &[channel.as_str().into_datum(), "".into_datum()],
        );
    }
}

/// Messages this transaction makes ready may be ready from `ready_at`, which may be before it began:
/// the queues' read positions move back that far at commit.
pub fn note_ready_from(ready_at: pg_sys::TimestampTz) {
    EARLIEST_READY.with(|earliest| {
        earliest.set(Some(
            earliest.get().map_or(ready_at, |was| was.min(ready_at)),
        ))
    });
}

/// This transaction handed a fan-out to the worker; wake it at commit.
pub fn note_fanout() {
    FANOUT.with(|fanout| fanout.set(true));
}

/// Called by `xact` at each transaction event.
pub(super) fn at_transaction_end(event: pg_sys::XactEvent::Type) {
    use pg_sys::XactEvent::*;
    match event {
        // Decided as late as possible: where no worker is registered now, the transaction notifies
        // itself. A prepared transaction must, too: PostgreSQL then refuses the PREPARE, as it
        // refuses every PREPARE after a NOTIFY.
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE
            if NOTIFY_AT_COMMIT.with(|queues| !queues.borrow().is_empty())
                && (event == XACT_EVENT_PRE_PREPARE || !worker_registered()) =>
        {
            let queues = NOTIFY_AT_COMMIT.with(|queues| std::mem::take(&mut *queues.borrow_mut()));
            for (_, name) in queues {
                send_notify(&name);
            }
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            LOCKED.with(|locked| locked.borrow_mut().take());
            let ready = READY.with(|ready| ready.borrow_mut().take());
            let earliest = EARLIEST_READY.with(Cell::take);
            let put = PUT.with(|put| std::mem::take(&mut *put.borrow_mut()));
            let fanout = FANOUT.with(|fanout| fanout.replace(false));
            if WAKE_LAUNCHER.with(|wake| wake.replace(false)) && shared_memory() {
                wake_launcher();
            }
            let notify: Vec<i32> = NOTIFY_AT_COMMIT
                .with(|queues| std::mem::take(&mut *queues.borrow_mut()))
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            if shared_memory() {
                move_positions_back(put, earliest);
                arrive(ready);
                if fanout || !notify.is_empty() {
                    send_errands(fanout, &notify);
                }
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            let released = LOCKED.with(|locked| locked.borrow_mut().take());
            if event != XACT_EVENT_PREPARE && shared_memory() {
                arrive(released);
            }
            READY.with(|ready| ready.borrow_mut().take());
            EARLIEST_READY.with(Cell::take);
            PUT.with(|put| put.borrow_mut().clear());
            NOTIFY_AT_COMMIT.with(|queues| queues.borrow_mut().clear());
            FANOUT.with(|fanout| fanout.set(false));
            WAKE_LAUNCHER.with(|wake| wake.set(false));
        }
        _ => {}
    }
}

/// Called by `xact` at each subtransaction event. What an aborted subtransaction made ready never
/// happened; what it locked by reading is ready again now, so its waiting readers are woken.
pub(super) fn at_subtransaction_end(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
) {
    READY.with(|ready| {
        ready
            .borrow_mut()
            .at_subtransaction_end(event, subtransaction)
    });
    let released = LOCKED.with(|locked| {
        locked
            .borrow_mut()
            .at_subtransaction_end(event, subtransaction)
    });
    if shared_memory() {
        arrive(released);
    }
}

/// The committed messages put in `queue_ids` are visible now, before any reader is woken for them: each
/// queue's read position moves back, in its priority, to where they may be. None is ready before the
/// transaction began (each takes the clock when it is written) or `earliest`. Messages of another
/// priority are read from their priority's head (`message::read_position`).
fn move_positions_back(mut queue_ids: Vec<i32>, earliest: Option<pg_sys::TimestampTz>) {
    // SAFETY: a plain read of the transaction's start, still set at its commit.
    let began = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let floor = earliest.map_or(began, |earliest| earliest.min(began));
    queue_ids.sort_unstable();
    queue_ids.dedup();
    for queue_id in queue_ids {
        super::positions::lower(queue_id, floor, |held| {
            held.map(|mut held| {
                if held.ready_at > floor {
                    held.ready_at = floor;
                    held.message_id = i64::MIN;
                }
                held
            })
        });
    }
}

/// Messages became ready in these queues (`(queue, how many)`, in any order, repeats allowed), visible to
/// others already: an arrival is counted for each queue, and its waiting readers are woken.
fn arrive(ready: Vec<(i32, u32)>) {
    if ready.is_empty() {
        return;
    }
    let arrived: Vec<(i32, u32, u64)> =
        sum_per_key(ready, |sum, count| *sum = sum.saturating_add(count))
            .into_iter()
            .map(|(queue_id, count)| (queue_id, count, arrivals::arrived(queue_id)))
            .collect();
    wake_readers(&arrived);
}

/// Wakes, for each queue (sorted, with the arrival count after the commit), waiting readers that are
/// not woken yet until together they take as many messages as the commit made ready: one send wakes
/// one reader, not every reader of the queue, which would all race for the same message. When too few
/// readers are asleep, the woken ones are told that the commit counts on their next read. A woken
/// reader that reads a full batch passes the wake on (`Waiting::done`), so that nothing ready is left
/// with its readers asleep.
fn wake_readers(ready: &[(i32, u32, u64)]) {
    // Sequentially consistent with `Waiting::register` (see there).
    if READERS_WAITING.get().load(Ordering::SeqCst) == 0 {
        return;
    }
    let database = crate::pg::my_database().to_u32();
    let mut sleepers = SLEEPERS.exclusive();
    let mut left: Vec<u32> = ready.iter().map(|&(_, messages, _)| messages).collect();
    let position = |reader: &Sleeper| {
        if reader.pid == 0 || reader.database != database {
            return None;
        }
        ready
            .binary_search_by_key(&reader.queue_id, |&(queue_id, _, _)| queue_id)
            .ok()
    };
    for reader in sleepers.readers.iter_mut() {
        let Some(at) = position(reader) else {
            continue;
        };
        if reader.woken || left[at] == 0 {
            continue;
        }
        left[at] = left[at].saturating_sub(reader.wants.max(1));
        reader.woken = true;
        reader.woken_at = ready[at].2;
        // SAFETY: a registered reader's latch is its PGPROC's, valid while its slot is taken, and the
        // slot cannot be freed while we hold the lock.
        unsafe { pg_sys::SetLatch(reader.latch as *mut pg_sys::Latch) };
    }
    if left.iter().all(|&messages| messages == 0) {
        return;
    }
    for reader in sleepers.readers.iter_mut() {
        let Some(at) = position(reader) else {
            continue;
        };
        if reader.woken && left[at] > 0 {
            reader.passed_by = true;
            reader.passed_at = reader.passed_at.max(ready[at].2);
        }
    }
}

/// Hands a wake on to another reader of the queue: messages committed before now may be left.
fn hand_on(queue_id: i32) {
    wake_readers(&[(queue_id, 1, arrivals::seen(queue_id))]);
}

/// Hands this database's worker a fan-out and queues to notify, and wakes it.
fn send_errands(fanout: bool, notify: &[i32]) {
    let database = crate::pg::my_database().to_u32();
    let mut sleepers = SLEEPERS.exclusive();
    for worker in sleepers.workers.iter_mut() {
        if worker.pid != 0 && worker.database == database {
            worker.errands.fanout |= fanout;
            for &queue_id in notify {
                worker.errands.add_notify(queue_id);
            }
            // SAFETY: the slot is taken, so its latch belongs to a live process of this cluster;
            // the lock keeps it from leaving while it is set.
            unsafe { pg_sys::SetLatch(worker.latch as *mut pg_sys::Latch) };
        }
    }
}

/// Puts back errands a worker took but could not run (yet), for its next look.
pub fn return_errands(errands: &Errands) {
    let pid = crate::pg::my_pid();
    let mut sleepers = SLEEPERS.exclusive();
    if let Some(worker) = sleepers.workers.iter_mut().find(|worker| worker.pid == pid) {
        worker.errands.fanout |= errands.fanout;
        worker.errands.notify_all |= errands.notify_all;
        for &queue_id in errands.notify() {
            worker.errands.add_notify(queue_id);
        }
    }
}

/// The errands commits left for this worker, now taken over.
pub fn take_errands() -> Errands {
    if !shared_memory() {
        return Errands::default();
    }
    let pid = crate::pg::my_pid();
    let mut sleepers = SLEEPERS.exclusive();
    sleepers
        .workers
        .iter_mut()
        .find(|worker| worker.pid == pid)
        .map(|worker| std::mem::take(&mut worker.errands))
        .unwrap_or_default()
}

/// Sets the latch of the worker registered for `database`; database 0 is the launcher's.
fn wake_workers_of(database: u32) {
    let sleepers = SLEEPERS.share();
    for worker in sleepers.workers.iter() {
        if worker.pid != 0 && worker.database == database {
            // SAFETY: as in send_errands: a taken slot's latch, set under the lock.
            unsafe { pg_sys::SetLatch(worker.latch as *mut pg_sys::Latch) };
        }
    }
}

fn me(queue_id: i32) -> Sleeper {
    // SAFETY: this process's own latch, which lives in shared memory as long as the process.
    unsafe {
        Sleeper {
            pid: pg_sys::MyProcPid,
            database: pg_sys::MyDatabaseId.to_u32(),
            queue_id,
            latch: pg_sys::MyLatch as usize,
            ..Sleeper::default()
        }
    }
}

/// Frees every slot this process holds, including ones left by an error that skipped a Drop.
fn release_all(sleepers: &mut Sleepers) -> u32 {
    let pid = crate::pg::my_pid();
    let mut freed = 0;
    for slot in sleepers
        .readers
        .iter_mut()
        .chain(sleepers.workers.iter_mut())
    {
        if slot.pid == pid {
            *slot = Sleeper::default();
            freed += 1;
        }
    }
    freed
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, _argument: pg_sys::Datum) {
    if shared_memory() {
        let mut sleepers = SLEEPERS.exclusive();
        let pid = crate::pg::my_pid();
        let readers = sleepers
            .readers
            .iter()
            .filter(|reader| reader.pid == pid)
            .count() as u32;
        release_all(&mut sleepers);
        READERS_WAITING.get().fetch_sub(readers, Ordering::AcqRel);
    }
}

/// Whether a worker is registered for this database (a worker that exits frees its slot).
pub fn worker_registered() -> bool {
    if !shared_memory() {
        return false;
    }
    let database = crate::pg::my_database().to_u32();
    SLEEPERS
        .share()
        .workers
        .iter()
        .any(|worker| worker.pid != 0 && worker.database == database)
}

/// Asks the launcher to look for databases to serve once this transaction commits: a worker it
/// started before then would not see the extension yet, and leave.
pub fn wake_launcher_at_commit() {
    WAKE_LAUNCHER.with(|wake| wake.set(true));
}

/// Asks the launcher (registered with no database) to look for databases to serve now.
fn wake_launcher() {
    wake_workers_of(0);
}

/// The launcher and each database worker announce themselves so that they can be woken: the
/// launcher by CREATE EXTENSION, a database worker by commits that hand it a fan-out.
pub fn register_worker() {
    IN_WORKER.with(|in_worker| in_worker.set(true));
    if !shared_memory() {
        return;
    }
    ensure_exit_hook();
    let mut sleepers = SLEEPERS.exclusive();
    release_all(&mut sleepers);
    let database = crate::pg::my_database().to_u32();
    let free = sleepers
        .workers
        .iter()
        .position(|slot| slot.pid == 0 || slot.database == database);
    if let Some(index) = free {
        sleepers.workers[index] = me(0);
    }
}
