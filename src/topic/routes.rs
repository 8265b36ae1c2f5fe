//! Each backend keeps the subscriptions (of queues and of streams) as token tries, built on first use
//! and rebuilt after a change to subscriptions, queues or streams (see `invalidation`).
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::spi::SpiClient;

use crate::error::BusResult;
use crate::pg::invalidation;
use crate::plans::{self, Statement};
use crate::routing::PatternIndex;

/// What a publish needs to know about the queues that subscriptions name.
pub struct Routes {
    pub index: PatternIndex<i32>,
    /// Name and notify flag of every subscribed queue.
    pub queues: HashMap<i32, (String, bool)>,
    /// The streams `publish` appends to, by the patterns they subscribed with: places in
    /// `stream_names`.
    pub streams: PatternIndex<usize>,
    pub stream_names: Vec<String>,
}

thread_local! {
    /// The routes and the invalidation generation they were loaded at.
    static ROUTES: RefCell<Option<(u64, Rc<Routes>)>> = const { RefCell::new(None) };
}

// Run as a writing statement so that it takes a new snapshot (at READ COMMITTED), not the one the
// calling statement started with: a subscription committed in between must not be missed.
static LOAD_SUBSCRIPTIONS: Statement = Statement {
    sql: "SELECT s.queue_id, s.pattern, q.name, q.notify
          FROM bussig.subscription s JOIN bussig.queue q USING (queue_id)",
    args: &[],
    writes: true,
};

// As LOAD_SUBSCRIPTIONS, for streams.
static LOAD_STREAM_SUBSCRIPTIONS: Statement = Statement {
    sql: "SELECT s.name, sub.pattern FROM bussig.stream_subscription sub JOIN bussig.stream s USING (stream_id)",
    args: &[],
    writes: true,
};

/// The current routes, loading them when a change (or nothing yet) left none cached.
pub fn routes(client: &mut SpiClient<'_>) -> BusResult<Rc<Routes>> {
    let generation = invalidation::generation(client)?;
    let cached = ROUTES.with(|routes| routes.borrow().clone());
    if let Some((loaded_at, routes)) = cached {
        if loaded_at == generation {
            return Ok(routes);
        }
    }
    let mut routes = Routes {
        index: PatternIndex::new(),
        queues: HashMap::new(),
        streams: PatternIndex::new(),
        stream_names: Vec::new(),
    };
    for row in plans::run(client, &LOAD_SUBSCRIPTIONS, &[])? {
        let queue_id: i32 = plans::filled(&row, 1, "queue id")?;
        let pattern: String = plans::filled(&row, 2, "pattern")?;
        routes.index.insert(&pattern, queue_id);
        let name = plans::filled(&row, 3, "queue name")?;
        routes
            .queues
            .insert(queue_id, (name, plans::filled(&row, 4, "notify")?));
    }
    for row in plans::run(client, &LOAD_STREAM_SUBSCRIPTIONS, &[])? {
        let name: String = plans::filled(&row, 1, "stream name")?;
        let pattern: String = plans::filled(&row, 2, "pattern")?;
        let place = match routes.stream_names.iter().position(|known| *known == name) {
            Some(place) => place,
            None => {
                routes.stream_names.push(name);
                routes.stream_names.len() - 1
            }
        };
        routes.streams.insert(&pattern, place);
    }
    let routes = Rc::new(routes);
    if invalidation::may_keep(generation) {
        ROUTES.with(|cached| *cached.borrow_mut() = Some((generation, routes.clone())));
    }
    Ok(routes)
}
