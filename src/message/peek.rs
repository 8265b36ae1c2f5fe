//! peek: a queue's messages in delivery order without locking them, ready ones first.
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;

use super::{missing_body, nothing_done};
use crate::access::{self, Privilege};
use crate::error::BusResult;
use crate::pg::datum::Jsonb;
use crate::plans::{self, Statement};

// Ready messages in delivery order, then the rest in the order they will become ready; a message
// waiting behind its group's head shows when it would be ready, and comes last.
static PEEK: Statement = Statement {
    sql: concat!(
        "WITH RECURSIVE q AS (SELECT queue_id, clock_timestamp() AS now FROM bussig.queue WHERE name = $1), ",
        queue_priorities!("(SELECT queue_id FROM q)"),
        "
          (SELECT ready.message_id, 'ready' AS state, ready.visible_at, ready.subject,
                  coalesce(ready.payload, (SELECT b.payload FROM bussig.body b WHERE b.body_id = ready.body_id)),
                  ready.headers, ready.delivery_count, ready.priority, ready.enqueued_at,
                  ready.correlation_id, ready.reply_to, ready.group_id
           FROM priorities CROSS JOIN LATERAL (
               SELECT in_order.* FROM bussig.message in_order
               WHERE in_order.queue_id = (SELECT queue_id FROM q) AND in_order.priority = priorities.priority
                 AND in_order.visible_at <= (SELECT now FROM q)
               ORDER BY in_order.visible_at, in_order.message_id
               LIMIT $2) ready
           ORDER BY ready.priority DESC, ready.visible_at, ready.message_id
           LIMIT $2)
          UNION ALL
          (SELECT later.message_id,
                  CASE WHEN later.lock_token IS NOT NULL THEN 'locked'
                       WHEN later.visible_at = 'infinity' THEN 'waiting_in_group'
                       ELSE 'delayed' END,
                  coalesce(later.group_ready_at, later.visible_at), later.subject,
                  coalesce(later.payload, (SELECT b.payload FROM bussig.body b WHERE b.body_id = later.body_id)),
                  later.headers, later.delivery_count, later.priority, later.enqueued_at, later.correlation_id,
                  later.reply_to, later.group_id
           FROM priorities CROSS JOIN LATERAL (
               SELECT in_order.* FROM bussig.message in_order
               WHERE in_order.queue_id = (SELECT queue_id FROM q) AND in_order.priority = priorities.priority
                 AND in_order.visible_at > (SELECT now FROM q)
               ORDER BY in_order.visible_at, in_order.message_id
               LIMIT $2) later
           ORDER BY later.visible_at, later.priority DESC, later.message_id
           LIMIT $2)
          LIMIT $2"
    ),
    args: &[pg_sys::TEXTOID, pg_sys::INT4OID],
    writes: false,
};

/// A message as a row: the `$lead` columns, then subject, payload, headers, delivery_count, priority,
/// enqueued_at, correlation_id, reply_to and group_id, as every listing of messages has them.
macro_rules! message_row {
    ($($lead:ty),*) => {
        (
            $($lead,)*
            Option<String>,
            $crate::pg::datum::Jsonb,
            Option<$crate::pg::datum::Jsonb>,
            i32,
            i32,
            pgrx::datum::TimestampWithTimeZone,
            Option<String>,
            Option<String>,
            Option<String>,
        )
    };
}
pub(crate) use message_row;

/// One message as peek shows it: its state and when it is (or would be) visible after its id.
pub type PeekRow = message_row!(i64, String, TimestampWithTimeZone);

/// Up to `max_messages` messages of `queue`: ready ones in delivery order, then the rest in the order
/// they become ready.
pub fn peek(queue: &str, max_messages: i32) -> BusResult<Vec<PeekRow>> {
    access::connect(|client, caller| -> BusResult<Vec<PeekRow>> {
        caller.require(client, queue, Privilege::Consume)?;
        let mut rows = Vec::new();
        for row in plans::run(client, &PEEK, &[queue.into(), max_messages.into()])? {
            let message_id = plans::filled(&row, 1, "message id")?;
            let payload = row
                .get::<Jsonb>(5)?
                .ok_or_else(|| missing_body(message_id, queue))?;
            rows.push((
                message_id,
                plans::filled(&row, 2, "state")?,
                plans::filled(&row, 3, "visible time")?,
                row.get::<String>(4)?,
                payload,
                row.get::<Jsonb>(6)?,
                plans::filled(&row, 7, "delivery count")?,
                plans::filled(&row, 8, "priority")?,
                plans::filled(&row, 9, "enqueue time")?,
                row.get::<String>(10)?,
                row.get::<String>(11)?,
                row.get::<String>(12)?,
            ));
        }
        if rows.is_empty() {
            return nothing_done(client, queue, rows);
        }
        Ok(rows)
    })
}
