//! Where a queue's ready messages begin, so that a read through a backlog starts its index scan
//! there. From the head, it would first step over the index entries of every message consumed since
//! the last VACUUM (all of them while a snapshot is held), and over every message the other readers
//! hold: with a hundred readers, each read stepped over a thousand locked messages. So positions are
//! shared by the backends (`pg::positions`; each backend keeps its own when bussig is not preloaded),
//! and a read starts past what any reader took.
//!
//! A shared position is kept behind every ready message of its priority, so that a read from it
//! that comes up short has found all there was. Whatever makes a message ready behind it moves it
//! back: a commit that made messages ready, before it wakes a reader (`pg::wakeup`), and a reader
//! that rolls back what it locked. A read raises it to the first message it locked, but no further
//! than where it was moved back to since the read loaded it (its snapshot may have missed what came
//! back there). Messages of other priorities are read from their own heads. As a safety net, a
//! position lives `SHARED_LIFETIME` from when it was first set; then one reader reads from the head
//! while the others go on. Under a held snapshot that read walks every dead entry since the
//! snapshot began, so it comes once a second, not once per read.
//!
//! A backend's own position is moved back by nothing but its own transactions: it is kept only
//! after a read that found all it asked for, for `OWN_LIFETIME`, and a read from it that comes up
//! short reads the rest from the head.
use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::time::Duration;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;

use crate::pg::positions::{self, Stored};

const SHARED_LIFETIME: Duration = Duration::from_secs(1);
/// A message behind a backend's own position waits for it to expire unless a read comes up short.
const OWN_LIFETIME: Duration = Duration::from_millis(200);

/// Positions of at most this many queues per backend, when each keeps its own; past it, all are
/// forgotten.
const QUEUES_KEPT: usize = 1000;

/// A message's place in delivery order: higher priority first, then earlier ready, then older.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Position {
    pub priority: i32,
    pub ready_at: TimestampWithTimeZone,
    pub message_id: i64,
}

impl Ord for Position {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .priority
            .cmp(&self.priority)
            .then(self.ready_at.cmp(&other.ready_at))
            .then(self.message_id.cmp(&other.message_id))
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Position {
    fn stored(self, since: u64) -> Stored {
        Stored {
            priority: self.priority,
            ready_at: self.ready_at.into_inner(),
            message_id: self.message_id,
            since,
        }
    }

    fn of(stored: Stored) -> Option<Position> {
        Some(Position {
            priority: stored.priority,
            ready_at: TimestampWithTimeZone::try_from(stored.ready_at).ok()?,
            message_id: stored.message_id,
        })
    }
}

thread_local! {
    /// This backend's own positions, by queue id, when they are not shared.
    static OWN: RefCell<HashMap<i32, Stored>> = RefCell::new(HashMap::new());
    /// What this transaction locked in each queue, by reading.
    static LOCKED: RefCell<Vec<(i32, Locks)>> = const { RefCell::new(Vec::new()) };
}

/// This backend's own position of the queue, fresh or not.
fn own(queue_id: i32) -> Option<Stored> {
    OWN.with(|own| own.borrow().get(&queue_id).copied())
}

fn fresh(stored: &Stored) -> bool {
    let lifetime = match positions::shared() {
        true => SHARED_LIFETIME,
        false => OWN_LIFETIME,
    };
    positions::now().saturating_sub(stored.since) < lifetime.as_micros() as u64
}

/// Where a read starts, and what it needs to move the position on afterwards.
#[derive(Clone, Copy, Debug)]
pub struct Recalled {
    pub start: Option<Position>,
    /// When the position was loaded (shared positions).
    loaded_at: u64,
    /// Whether a read from `start` that comes up short found all there was.
    pub complete: bool,
}

/// Where to read the queue from: its position, or the head when it has none, or when its lifetime
/// ran out and this reader took the read from the head on itself (the position lives on meanwhile
/// for the others). Call it before the read's snapshot is taken.
pub fn recall(queue_id: i32) -> Recalled {
    if !positions::shared() {
        return Recalled {
            start: own(queue_id).filter(fresh).and_then(Position::of),
            loaded_at: 0,
            complete: false,
        };
    }
    // Twice at most: a reader that finds the position expired and loses the read from the head to
    // another takes the renewed one.
    for _ in 0..2 {
        let loaded = positions::load(queue_id);
        let recalled = |start| Recalled {
            start,
            loaded_at: loaded.loaded_at,
            complete: true,
        };
        let Some(stored) = loaded.stored else {
            return recalled(None);
        };
        if fresh(&stored) {
            return recalled(Position::of(stored));
        }
        let claimed = std::cell::Cell::new(false);
        positions::raise(queue_id, loaded.loaded_at, |held, _| {
            held.map(|held| {
                if held != stored {
                    return held;
                }
                claimed.set(true);
                Stored {
                    since: positions::now(),
                    ..held
                }
            })
        });
        if claimed.get() {
            return recalled(None);
        }
    }
    Recalled {
        start: None,
        loaded_at: positions::load(queue_id).loaded_at,
        complete: true,
    }
}

/// The priority of the queue's position, or 0 (the default) when it has none: where to look for the
/// queue's priorities around without walking the front of one's range (`priorities_around!`).
pub fn priority_hint(queue_id: i32) -> i32 {
    let stored = match positions::shared() {
        true => positions::load(queue_id).stored,
        false => own(queue_id),
    };
    stored.map_or(0, |stored| stored.priority)
}

/// A read from `recalled` locked messages from `first` on, and found as many as it asked for if
/// `took_all`: the position moves on to `first`. A full read from the head moves it back to `first`
/// instead: it may have left ready messages behind the position.
pub fn remember(queue_id: i32, recalled: Recalled, first: Position, took_all: bool) {
    if !positions::shared() {
        if took_all {
            own_update(queue_id, |held| Some(furthest(held, first, true)));
        } else {
            forget(queue_id);
        }
        return;
    }
    if recalled.start.is_none() && took_all {
        // A full read from the head: ready messages may lie between `first` and the position.
        positions::lower(queue_id, first.ready_at.into_inner(), |held| match held {
            Some(held) if Position::of(held).is_some_and(|kept| kept > first) => {
                Some(first.stored(held.since))
            }
            Some(held) => Some(held),
            None => Some(first.stored(positions::now())),
        });
    } else if !crate::pg::xact::snapshot_is_fixed() {
        // A snapshot taken before the position was loaded may have missed a commit that moved it
        // back, unseen by the cap: such a read does not raise it.
        positions::raise(queue_id, recalled.loaded_at, |held, cap| {
            match capped(first, cap) {
                Some(first) => Some(furthest(held, first, false)),
                None => held,
            }
        });
    }
}

/// `first`, or no further than `cap` (a ready time) in its priority: a commit since the read loaded
/// the position may have made messages ready from there, any message id. None when that is not
/// known.
fn capped(first: Position, cap: i64) -> Option<Position> {
    if first.ready_at.into_inner() < cap {
        return Some(first);
    }
    if cap == i64::MIN {
        return None;
    }
    Some(Position {
        priority: first.priority,
        ready_at: TimestampWithTimeZone::try_from(cap).ok()?,
        message_id: i64::MIN,
    })
}

/// `position`, or the one held when it is further; one held keeps its age, so that it still expires
/// in time. An expired one is set anew when `renew` (a backend's own), and stays expired otherwise:
/// only the reader that claims the read from the head renews a shared one.
fn furthest(held: Option<Stored>, position: Position, renew: bool) -> Stored {
    match held.filter(|held| !renew || fresh(held)) {
        Some(held) => {
            let furthest = Position::of(held).map_or(position, |kept| kept.max(position));
            furthest.stored(held.since)
        }
        None => position.stored(positions::now()),
    }
}

fn own_update(queue_id: i32, change: impl FnOnce(Option<Stored>) -> Option<Stored>) {
    OWN.with(|own| {
        let mut own = own.borrow_mut();
        match change(own.get(&queue_id).copied()) {
            Some(stored) => {
                if own.len() >= QUEUES_KEPT && !own.contains_key(&queue_id) {
                    own.clear();
                }
                own.insert(queue_id, stored);
            }
            None => {
                own.remove(&queue_id);
            }
        }
    });
}

/// Forgets the queue's position: the next read starts at the head.
pub fn forget(queue_id: i32) {
    if positions::shared() {
        positions::lower(queue_id, i64::MIN, |_| None);
    } else {
        own_update(queue_id, |_| None);
    }
}

/// What one read locked in a queue.
#[derive(Clone, Copy, Debug)]
pub struct Locks {
    /// The first in delivery order, and the earliest ready time (in any priority): where they are
    /// ready again should the transaction roll back.
    first: Option<Position>,
    earliest: i64,
    /// When the locks end, as a ready time.
    pub until: i64,
}

impl Default for Locks {
    fn default() -> Locks {
        Locks {
            first: None,
            earliest: i64::MAX,
            until: i64::MAX,
        }
    }
}

impl Locks {
    pub fn add(&mut self, position: Position) {
        self.first = Some(self.first.map_or(position, |first| first.min(position)));
        self.earliest = self.earliest.min(position.ready_at.into_inner());
    }

    fn merge(&mut self, other: Locks) {
        if let Some(first) = other.first {
            self.add(first);
        }
        self.earliest = self.earliest.min(other.earliest);
        self.until = self.until.min(other.until);
    }
}

/// This transaction locked messages of the queue by reading them.
pub fn note_locked(queue_id: i32, locks: Locks) {
    if locks.first.is_none() {
        return;
    }
    LOCKED.with(|locked| {
        let mut locked = locked.borrow_mut();
        match locked.iter_mut().find(|(id, _)| *id == queue_id) {
            Some((_, noted)) => noted.merge(locks),
            None => locked.push((queue_id, locks)),
        }
    });
}

/// What this transaction (or the subtransaction ending) locked is ready again: each queue's position
/// moves back to it, and no read that loaded the position before raises it past the earliest of it.
/// After a subtransaction, the whole transaction's are moved back to: more than needed, which costs a
/// read some index steps, never a message.
fn locks_released() {
    let locked = LOCKED.with(|locked| locked.borrow().clone());
    for (queue_id, locks) in locked {
        let Some(first) = locks.first else { continue };
        if positions::shared() {
            positions::lower(queue_id, locks.earliest, |held| {
                held.map(|held| match Position::of(held) {
                    Some(kept) if kept > first => first.stored(held.since),
                    _ => held,
                })
            });
        } else {
            forget(queue_id);
        }
    }
}

/// This transaction commits: a lock of it that ended already (a transaction that outlived its lock
/// timeout) leaves its message ready behind where other reads, which skipped the row it held, may have
/// moved the position. Such a queue's position is forgotten, and a waiting reader is woken: one that
/// passed over the row while it was held has nothing else to wake it before its wait ends. (Called
/// before `pg::wakeup` takes what this commit made readable.)
fn lapsed_locks_committed() {
    let locked = LOCKED.with(|locked| std::mem::take(&mut *locked.borrow_mut()));
    if locked.is_empty() {
        return;
    }
    let now = pgrx::datetime::clock_timestamp().into_inner();
    for (queue_id, locks) in locked {
        if locks.until <= now {
            forget(queue_id);
            crate::pg::wakeup::note_readable(queue_id, 1);
        }
    }
}

/// Called by `pg::xact` at each transaction event.
pub fn at_transaction_end(event: pg_sys::XactEvent::Type) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            locks_released();
            LOCKED.with(|locked| locked.borrow_mut().clear());
        }
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            lapsed_locks_committed()
        }
        pg_sys::XactEvent::XACT_EVENT_PREPARE => LOCKED.with(|locked| locked.borrow_mut().clear()),
        _ => {}
    }
}

/// Called by `pg::xact` at each subtransaction event.
pub fn at_subtransaction_end(event: pg_sys::SubXactEvent::Type) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        locks_released();
    }
}
