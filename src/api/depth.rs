//! `bussig.queue_depth`: how many messages a queue holds, for producers and autoscalers to poll.
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use super::queues;
use crate::access;
use crate::validate;

/// Every message of the queue: ready, delayed and locked. Read from counts kept in shared memory,
/// so it costs the same however many dead rows churn left behind (see src/depth).
#[pg_extern]
fn queue_depth(queue: Option<&str>) -> Result<i64, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    Ok(access::connect(|client, caller| {
        caller.require_some(client, queue, None)?;
        let queue_id = queues::require_destination(client, queue)?.queue_id;
        crate::depth::messages(client, queue_id)
    })?)
}
