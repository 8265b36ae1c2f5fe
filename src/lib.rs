//! bussig: a message bus inside PostgreSQL. The SQL surface lives in `api`, storage in `sql/`.
// The SQL boundary returns pgrx's ErrorReport, which is large by design; it is built only on error.
#![allow(clippy::result_large_err)]

use pgrx::prelude::*;

/// `priorities(priority)`: the priorities that messages of queue `$queue` have, highest first, one index
/// probe each (only those `$condition` on `in_order_p.priority` allows, when given). PostgreSQL 15 has no skip scan: what must be ordered by
/// `visible_at` across priorities reads each priority's own range in order instead of sorting the queue.
macro_rules! queue_priorities {
    ($queue:literal) => {
        queue_priorities!($queue, "")
    };
    ($queue:literal, $condition:expr) => {
        concat!(
            "priorities(priority) AS (
                 (SELECT in_order_p.priority FROM bussig.message in_order_p
                  WHERE in_order_p.queue_id = ",
            $queue,
            $condition,
            " ORDER BY in_order_p.priority DESC LIMIT 1)
                 UNION ALL
                 SELECT (SELECT in_order_p.priority FROM bussig.message in_order_p
                         WHERE in_order_p.queue_id = ",
            $queue,
            " AND in_order_p.priority < priorities.priority",
            $condition,
            " ORDER BY in_order_p.priority DESC LIMIT 1)
                 FROM priorities WHERE priorities.priority IS NOT NULL
             )"
        )
    };
}

/// `in_turn(priority)`: the priorities of queue `$queue`'s messages, highest first, as
/// `queue_priorities!` finds them, but around priority `$pivot`: those above it, then `$pivot` itself
/// (whether it has messages or not), then those below. No probe walks `$pivot`'s range, whose front
/// holds an entry for every message consumed there until VACUUM (all of them while a snapshot is
/// held): only another priority's. Defines the CTEs `priorities` and `from_pivot` for it.
macro_rules! priorities_around {
    ($queue:literal, $pivot:literal) => {
        concat!(
            queue_priorities!($queue, concat!(" AND in_order_p.priority > ", $pivot)),
            ", from_pivot(priority) AS (
                 SELECT ",
            $pivot,
            "
                 UNION ALL
                 SELECT (SELECT in_order_p.priority FROM bussig.message in_order_p
                         WHERE in_order_p.queue_id = ",
            $queue,
            " AND in_order_p.priority < from_pivot.priority
                         ORDER BY in_order_p.priority DESC LIMIT 1)
                 FROM from_pivot WHERE from_pivot.priority IS NOT NULL
             ), in_turn(priority) AS (
                 SELECT priority FROM priorities WHERE priority IS NOT NULL
                 UNION ALL SELECT priority FROM from_pivot WHERE priority IS NOT NULL
             )"
        )
    };
}

/// SQL: whether the extension was made (CREATE EXTENSION, or its update) within the hour, as
/// `bussig.stream_body_ring.made_at` says (not dumped: a restore's CREATE EXTENSION sets it). A
/// restore loads the extension's tables one by one meanwhile, so the worker judges nothing gone by
/// its absence then (design.md, "Nothing the worker deletes is judged by absence alone").
macro_rules! made_within_the_hour {
    () => {
        "(SELECT r.made_at FROM bussig.stream_body_ring r) > clock_timestamp() - interval '1 hour'"
    };
}

mod access;
mod api;
mod depth;
mod error;
mod message;
mod pg;
mod plans;
mod queue;
mod routing;
mod stream;
#[cfg(any(test, feature = "pg_test"))]
mod test_support;
mod topic;
mod validate;
mod worker;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/topics.sql", name = "topics", requires = ["schema"]);
extension_sql_file!(
    "../sql/streams.sql",
    name = "streams",
    requires = ["schema"]
);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    pg::init();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
