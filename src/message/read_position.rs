//! Where a queue's ready messages began at this backend's last read, so that the next read through a
//! backlog starts its index scan there. From the head, it would first step over the index entries of
//! every message consumed since the last VACUUM: over a large backlog, half of a read's time.
//!
//! A message can come back behind a position: a reader that had locked it rolled back, or a send that
//! began earlier committed later. So a position is kept only after a read that found all it asked for
//! (a read that comes up short forgets it, and a read from a position that comes up short reads the
//! rest from the head), and only for `LIFETIME`: such a message waits at most that long. A transaction
//! that rolls back forgets them all: what it read is back in the queue.
use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;

const LIFETIME: Duration = Duration::from_millis(200);

/// Positions of at most this many queues per backend; past it, all are forgotten.
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

thread_local! {
    static POSITIONS: RefCell<HashMap<String, (Position, Instant)>> = RefCell::new(HashMap::new());
}

/// The position to read `queue` from, if one is fresh.
pub fn recall(queue: &str) -> Option<Position> {
    POSITIONS.with(|positions| {
        positions
            .borrow()
            .get(queue)
            .filter(|(_, since)| since.elapsed() < LIFETIME)
            .map(|(position, _)| *position)
    })
}

/// Keeps `position` for `queue`; a fresh one keeps its age, so that it still expires in time.
pub fn remember(queue: &str, position: Position) {
    POSITIONS.with(|positions| {
        let mut positions = positions.borrow_mut();
        if let Some((kept, since)) = positions.get_mut(queue) {
            if since.elapsed() < LIFETIME {
                *kept = position;
                return;
            }
        }
        if positions.len() >= QUEUES_KEPT {
            positions.clear();
        }
        positions.insert(queue.to_string(), (position, Instant::now()));
    });
}

pub fn forget(queue: &str) {
    POSITIONS.with(|positions| positions.borrow_mut().remove(queue));
}

/// Forgets every position, as if their lifetime had passed.
pub fn forget_all() {
    POSITIONS.with(|positions| positions.borrow_mut().clear());
}

/// Called by `pg::xact` at each transaction event.
pub fn at_transaction_end(event: pg_sys::XactEvent::Type) {
    if event == pg_sys::XactEvent::XACT_EVENT_ABORT {
        forget_all();
    }
}
