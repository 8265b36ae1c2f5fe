//! Subscriptions: subscribe, unsubscribe, the heartbeat of ephemeral queues, and who a subject reaches.
use pgrx::datum::Interval;
use pgrx::pg_sys;

use super::routes;
use crate::access::{self, Privilege};
use crate::error::BusResult;
use crate::plans::{self, Statement};
use crate::queue::{self, SettingsChange};

static SUBSCRIBE: Statement = Statement {
    sql: "INSERT INTO bussig.subscription (queue_id, pattern) VALUES ($1, $2)
          ON CONFLICT (queue_id, pattern) DO NOTHING",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

static MAKE_EPHEMERAL: Statement = Statement {
    sql: "UPDATE bussig.queue SET ephemeral_ttl = $2, heartbeat_at = clock_timestamp() WHERE queue_id = $1",
    args: &[pg_sys::INT4OID, pg_sys::INTERVALOID],
    writes: true,
};

static UNSUBSCRIBE: Statement = Statement {
    sql: "DELETE FROM bussig.subscription WHERE queue_id = $1 AND pattern = $2",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

static HEARTBEAT: Statement = Statement {
    sql: "UPDATE bussig.queue SET heartbeat_at = clock_timestamp()
          WHERE name = $1 AND ephemeral_ttl IS NOT NULL",
    args: &[pg_sys::TEXTOID],
    writes: true,
};

/// Subscribes `queue` (created with default settings when missing) to `pattern`; with a `ttl` the
/// queue is ephemeral, dropped once its heartbeat stops for that long. False when it was subscribed.
pub fn subscribe(queue: &str, pattern: &str, ttl: Option<Interval>) -> BusResult<bool> {
    access::connect(|client, caller| -> BusResult<bool> {
        if !queue::create(client, caller, queue, SettingsChange::default(), None)? {
            caller.require(client, queue, Privilege::Manage)?;
        }
        let queue_id = queue::require(client, queue)?.queue_id;
        if let Some(ttl) = ttl {
            plans::run(client, &MAKE_EPHEMERAL, &[queue_id.into(), ttl.into()])?;
        }
        Ok(!plans::run(client, &SUBSCRIBE, &[queue_id.into(), pattern.into()])?.is_empty())
    })
}

/// False when `queue` had no such subscription.
pub fn unsubscribe(queue: &str, pattern: &str) -> BusResult<bool> {
    access::connect(|client, caller| -> BusResult<bool> {
        caller.require(client, queue, Privilege::Manage)?;
        let queue_id = queue::require(client, queue)?.queue_id;
        Ok(!plans::run(client, &UNSUBSCRIBE, &[queue_id.into(), pattern.into()])?.is_empty())
    })
}

/// True when the queue is ephemeral and now lives another ttl; false for a queue that is not.
pub fn heartbeat(queue: &str) -> BusResult<bool> {
    access::connect(|client, caller| -> BusResult<bool> {
        caller.require(client, queue, Privilege::Consume)?;
        if !plans::run(client, &HEARTBEAT, &[queue.into()])?.is_empty() {
            return Ok(true);
        }
        queue::require(client, queue)?;
        Ok(false)
    })
}

/// The queues a message published on `subject` would reach that the caller may see, with the
/// pattern that matched, sorted.
pub fn matching(subject: &str) -> BusResult<Vec<(String, String)>> {
    access::connect(|client, caller| -> BusResult<Vec<(String, String)>> {
        let routes = routes::routes(client)?;
        let matches = routes.index.matches(subject);
        let ids = matches.iter().map(|&(_, queue_id)| queue_id).collect();
        let visible = caller.permitted(client, ids, None)?;
        let mut rows: Vec<(String, String)> = matches
            .into_iter()
            .filter(|(_, queue_id)| visible.contains(queue_id))
            .filter_map(|(pattern, queue_id)| {
                routes
                    .queues
                    .get(&queue_id)
                    .map(|(name, _)| (name.clone(), pattern.to_string()))
            })
            .collect();
        rows.sort();
        Ok(rows)
    })
}
