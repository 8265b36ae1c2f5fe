//! reply: acknowledges a request and sends its reply to the request's `reply_to` queue, in one call,
//! correlated by the request's correlation id (its message id when it had none).
use pgrx::pg_sys;
use pgrx::Uuid;

use super::send::{check_size, reply_into};
use super::{group, in_flight, nothing_done};
use crate::access::{self, Privilege};
use crate::depth;
use crate::error::{BusError, BusResult};
use crate::pg::datum::Jsonb;
use crate::plans::{self, Statement};
use crate::queue;

// The request goes only with its current token; what it names comes back for the reply.
static TAKE_REQUEST: Statement = Statement {
    sql: concat!(
        "DELETE FROM bussig.message by_id
          WHERE queue_id = $1 AND message_id = $2 AND lock_token = $3
          RETURNING reply_to, coalesce(correlation_id, message_id::text), ",
        counted_group!()
    ),
    args: &[pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::UUIDOID],
    writes: true,
};

/// The reply's id, or None (nothing sent, nothing acked) for a stale token. 55000 when the request
/// names no `reply_to`, 42704 when that queue does not exist; either error undoes the ack.
pub fn reply(
    queue: &str,
    message_id: i64,
    lock_token: Uuid,
    payload: Jsonb,
    headers: Option<Jsonb>,
) -> BusResult<Option<i64>> {
    check_size(payload.size(), headers)?;
    access::connect(|client, caller| {
        caller.require(client, queue, Privilege::Consume)?;
        let found = queue::require(client, queue)?;
        let queue_id = found.queue_id;
        let args = [queue_id.into(), message_id.into(), lock_token.into()];
        let Some(request) = plans::run(client, &TAKE_REQUEST, &args)?.next() else {
            return nothing_done(client, queue, None);
        };
        let reply_to: Option<String> = request.get(1)?;
        let correlation_id: String = plans::filled(&request, 2, "correlation id")?;
        let Some(reply_to) = reply_to else {
            return Err(BusError::NoReplyTo {
                queue: queue.to_string(),
                message_id,
            });
        };
        depth::removed(queue_id, 1);
        if found.max_in_flight.is_some() {
            in_flight::release_one(client, queue_id, message_id, lock_token)?;
        }
        group::leave(
            client,
            queue_id,
            request.get::<String>(3)?.into_iter().collect(),
        )?;
        let id = reply_into(client, caller, &reply_to, payload, headers, &correlation_id)?;
        Ok(Some(id))
    })
}
