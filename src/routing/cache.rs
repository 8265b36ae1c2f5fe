//! Each backend keeps the subscriptions as a token trie, built on first use and dropped when a
//! trigger on the subscription and queue tables announces a change (a relcache invalidation on
//! `bussig.subscription`, delivered to every backend at commit and to this one at once).
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::PatternIndex;
use crate::error::BusResult;
use crate::plans::{self, Statement};

/// What a publish needs to know about the queues that subscriptions name.
pub struct Routes {
    pub index: PatternIndex<i32>,
    /// Name and notify flag of every subscribed queue.
    pub queues: HashMap<i32, (String, bool)>,
}

thread_local! {
    static ROUTES: RefCell<Option<Rc<Routes>>> = const { RefCell::new(None) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// The OID of bussig.subscription when the cached routes were loaded.
        static WATCHED: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    /// Bumped by every invalidation: routes loaded while it moved are not kept.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
}

// Run as a writing statement so that it takes a new snapshot (at READ COMMITTED), not the one the
// calling statement started with: a subscription committed in between must not be missed.
static LOAD_SUBSCRIPTIONS: Statement = Statement {
    sql: "SELECT s.queue_id, s.pattern, q.name, q.notify
          FROM bussig.subscription s JOIN bussig.queue q USING (queue_id)",
    args: &[],
    writes: true,
};

static SUBSCRIPTION_TABLE: Statement = Statement {
    sql: "SELECT to_regclass('bussig.subscription')::oid",
    args: &[],
    writes: false,
};

/// The OID of bussig.subscription, looked up each time: the extension may have been recreated.
fn subscription_table(client: &mut SpiClient<'_>) -> BusResult<Option<pg_sys::Oid>> {
    match plans::run(client, &SUBSCRIPTION_TABLE, &[])?.next() {
        Some(row) => Ok(row.get(1)?),
        None => Ok(None),
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_argument: pg_sys::Datum, relid: pg_sys::Oid) {
    let watched = WATCHED.with(Cell::get);
    if relid == pg_sys::InvalidOid || relid == watched || watched == pg_sys::InvalidOid {
        forget();
    }
}

fn forget() {
    GENERATION.with(|generation| generation.set(generation.get() + 1));
    ROUTES.with(|routes| routes.borrow_mut().take());
}

/// The current routes, loading them when a change (or nothing yet) left none cached.
pub fn routes(client: &mut SpiClient<'_>) -> BusResult<Rc<Routes>> {
    if !CALLBACK_REGISTERED.with(|registered| registered.replace(true)) {
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(
                Some(on_relcache_invalidation),
                pg_sys::Datum::from(0),
            )
        };
    }
    // Changes committed since this transaction last took a new lock are applied now.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    if let Some(routes) = ROUTES.with(|routes| routes.borrow().clone()) {
        return Ok(routes);
    }
    let generation = GENERATION.with(Cell::get);
    let mut routes = Routes {
        index: PatternIndex::new(),
        queues: HashMap::new(),
    };
    for row in plans::run(client, &LOAD_SUBSCRIPTIONS, &[])? {
        let queue_id: i32 = row.get(1)?.expect("NOT NULL");
        let pattern: String = row.get(2)?.expect("NOT NULL");
        routes.index.insert(&pattern, queue_id);
        routes.queues.insert(
            queue_id,
            (
                row.get(3)?.expect("NOT NULL"),
                row.get(4)?.expect("NOT NULL"),
            ),
        );
    }
    let watched = subscription_table(client)?;
    WATCHED.with(|cell| cell.set(watched.unwrap_or(pg_sys::InvalidOid)));
    let routes = Rc::new(routes);
    // Routes read under a transaction-long snapshot serve this call only.
    if !plans::snapshot_is_fixed() && GENERATION.with(Cell::get) == generation {
        ROUTES.with(|cached| *cached.borrow_mut() = Some(routes.clone()));
    }
    Ok(routes)
}

/// Called by the trigger on subscriptions and queues: every backend drops its routes (this one at
/// once, the others when this transaction commits).
#[pg_extern]
fn invalidate_routing() -> Result<(), pgrx::pg_sys::panic::ErrorReport> {
    forget();
    if let Some(table) = Spi::connect_mut(subscription_table)? {
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(table) };
    }
    Ok(())
}
