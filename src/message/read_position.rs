//! Where a queue's ready messages began at the latest read that found all it asked for, so that the
//! next read through a backlog starts its index scan there. From the head, it would first step over
//! the index entries of every message consumed since the last VACUUM (over a large backlog, half of a
//! read's time), and over every message the other readers hold: with a hundred readers, each read
//! stepped over a thousand locked messages. So positions are shared by the backends (`pg::positions`;
//! each backend keeps its own when bussig is not preloaded), and a read starts past what any reader
//! took.
//!
//! A message can come back behind a position: a reader that had locked it rolled back, or a send that
//! began earlier committed later. So a position is kept only after a read that found all it asked for
//! (a read that comes up short forgets it, and a read from a position that comes up short reads the
//! rest from the head), and only for `LIFETIME` from when it was first set: such a message waits at
//! most that long. A transaction that rolls back forgets the positions it moved: what it read is back
//! in the queue.
use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::time::Duration;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;

use crate::pg::positions::{self, Stored};

const LIFETIME: Duration = Duration::from_millis(200);

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
    /// Queues whose shared position this transaction moved.
    static MOVED: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
}

fn fresh(stored: &Stored) -> bool {
    positions::now().saturating_sub(stored.since) < LIFETIME.as_micros() as u64
}

fn load(queue_id: i32) -> Option<Stored> {
    if positions::shared() {
        positions::load(queue_id)
    } else {
        OWN.with(|own| own.borrow().get(&queue_id).copied())
    }
}

fn update(queue_id: i32, change: impl FnOnce(Option<Stored>) -> Option<Stored>) {
    if positions::shared() {
        positions::update(queue_id, change);
        return;
    }
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

/// The position to read the queue from, if one is fresh.
pub fn recall(queue_id: i32) -> Option<Position> {
    load(queue_id).filter(fresh).and_then(Position::of)
}

/// Moves the queue's position to `position`, or past it when another read moved it further; a fresh
/// one keeps its age, so that it still expires in time.
pub fn remember(queue_id: i32, position: Position) {
    update(queue_id, |held| match held.filter(fresh) {
        Some(held) => {
            let furthest = Position::of(held).map_or(position, |kept| kept.max(position));
            Some(furthest.stored(held.since))
        }
        None => Some(position.stored(positions::now())),
    });
    if positions::shared() {
        MOVED.with(|moved| {
            let mut moved = moved.borrow_mut();
            if !moved.contains(&queue_id) {
                moved.push(queue_id);
            }
        });
    }
}

pub fn forget(queue_id: i32) {
    update(queue_id, |_| None);
}

/// Forgets this backend's positions, and the shared ones its transaction moved.
pub fn forget_all() {
    OWN.with(|own| own.borrow_mut().clear());
    for queue_id in MOVED.with(|moved| std::mem::take(&mut *moved.borrow_mut())) {
        forget(queue_id);
    }
}

/// Called by `pg::xact` at each transaction event.
pub fn at_transaction_end(event: pg_sys::XactEvent::Type) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            forget_all()
        }
        pg_sys::XactEvent::XACT_EVENT_COMMIT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => MOVED.with(|moved| moved.borrow_mut().clear()),
        _ => {}
    }
}
