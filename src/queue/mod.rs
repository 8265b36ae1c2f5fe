//! Queues: looking them up (with a per-backend cache for the hot paths), their settings, and
//! creating, changing, dropping and purging them. The SQL functions are in `api/queues.rs`.
// The domain is written against SPI and `pg`: no unsafe code of its own.
#![deny(unsafe_code)]
mod definition;
mod settings;
#[cfg(any(test, feature = "pg_test"))]
mod tests;

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use crate::error::{BusError, BusResult};
use crate::pg::invalidation;
use crate::plans::{self, Statement};

pub use definition::{alter, create, drop, drop_by_id, purge};
pub use settings::SettingsChange;

/// A queue as the SQL functions need it, cached per backend by name: its id, whether commits that
/// make its messages ready NOTIFY, and its cap on messages locked at once. Its other settings are
/// read where they are used.
#[derive(Clone, Copy)]
pub struct Queue {
    pub queue_id: i32,
    pub notify: bool,
    pub max_in_flight: Option<i32>,
}

/// Queues a backend remembers before it starts over: names of short-lived queues come and go.
const KNOWN_QUEUES_LIMIT: usize = 10_000;

thread_local! {
    /// Queues this backend looked up by name, and the invalidation generation they belong to.
    static KNOWN: RefCell<(u64, HashMap<String, Queue>)> = RefCell::new((0, HashMap::new()));
}

// A writing statement, so that it reads with a new snapshot (see `invalidation::may_keep`). The row's
// xmin tells whether this transaction wrote it.
static FIND: Statement = Statement {
    sql: "SELECT queue_id, notify, xmin::text::bigint, max_in_flight FROM bussig.queue WHERE name = $1",
    args: &[pg_sys::TEXTOID],
    writes: true,
};

/// The queue named `name`, from this backend's cache when no change to any queue's name, notify
/// flag or cap, and no drop, came since. A queue this transaction created or changed is not cached: the
/// transaction may still roll back, and a new queue announces itself to no cache.
pub fn find(client: &mut SpiClient<'_>, name: &str) -> BusResult<Option<Queue>> {
    let generation = invalidation::generation(client)?;
    if let Some(found) = known(generation, name) {
        return Ok(Some(found));
    }
    let Some(row) = plans::run(client, &FIND, &[name.into()])?.next() else {
        return Ok(None);
    };
    let found = Queue {
        queue_id: plans::filled(&row, 1, "queue id")?,
        notify: plans::filled(&row, 2, "notify")?,
        max_in_flight: row.get(4)?,
    };
    let writer = plans::filled::<i64>(&row, 3, "xmin")? as u32;
    let written_here = crate::pg::xact::is_this_transaction(writer);
    if !written_here && invalidation::may_keep(generation) {
        KNOWN.with(|known| {
            let mut known = known.borrow_mut();
            if known.0 != generation || known.1.len() >= KNOWN_QUEUES_LIMIT {
                *known = (generation, HashMap::new());
            }
            known.1.insert(name.to_string(), found);
        });
    }
    Ok(Some(found))
}

fn known(generation: u64, name: &str) -> Option<Queue> {
    KNOWN.with(|known| {
        let known = known.borrow();
        (known.0 == generation)
            .then(|| known.1.get(name).copied())
            .flatten()
    })
}

/// The queue named `name` when this backend's cache holds it and can tell, without a statement,
/// that it is current.
pub fn cached(name: &str) -> Option<Queue> {
    known(invalidation::known_generation()?, name)
}

/// As `find`, or 42704 when there is no such queue.
pub fn require(client: &mut SpiClient<'_>, name: &str) -> BusResult<Queue> {
    find(client, name)?.ok_or_else(|| BusError::UnknownQueue(name.to_string()))
}

// Not cached: the invalidation that keeps the cache current does not follow this column, and only
// dead-lettering by hand and redrive need it. A writing statement, so that it reads in a snapshot at
// least as new as the one `find` read the queue in.
static DEAD_LETTER_QUEUE: Statement = Statement {
    sql: "SELECT dead_letter_queue_id FROM bussig.queue WHERE queue_id = $1",
    args: &[pg_sys::INT4OID],
    writes: true,
};

/// The dead-letter queue of `queue` (named `name`), read now; None for a queue without one (a
/// dead-letter queue); 42704 when it was dropped since it was found.
pub fn dead_letter_queue(
    client: &mut SpiClient<'_>,
    name: &str,
    queue: Queue,
) -> BusResult<Option<i32>> {
    let Some(row) = plans::run(client, &DEAD_LETTER_QUEUE, &[queue.queue_id.into()])?.next() else {
        return Err(BusError::UnknownQueue(name.to_string()));
    };
    Ok(row.get(1)?)
}
