//! `bussig.queue_depth`: how many messages a queue holds, for producers and autoscalers to poll.
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::access;
use crate::error::BusError;
use crate::queue;
use crate::validate;

/// Every message of the queue: ready, delayed and locked. Read from counts kept in shared memory,
/// so it costs the same however many dead rows churn left behind (see src/depth).
#[pg_extern]
fn queue_depth(queue: Option<&str>) -> Result<i64, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    Ok(access::connect(|client, caller| {
        caller.require_some(client, queue, None)?;
        let queue_id = queue::require(client, queue)?.queue_id;
        crate::depth::messages(client, queue_id)
    })?)
}

/// As `queue_depth`, but NULL for a queue that does not exist (any more): the `messages` of the
/// `bussig.queues` view, whose rows a concurrent `drop_queue` (the worker's of an ephemeral queue,
/// say) may remove while it runs, as the function looks the queue up anew.
#[pg_extern]
fn queue_depth_if_exists(queue: Option<&str>) -> Result<Option<i64>, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let depth = access::connect(|client, caller| {
        caller.require_some(client, queue, None)?;
        let queue_id = queue::require(client, queue)?.queue_id;
        crate::depth::messages(client, queue_id)
    });
    match depth {
        Ok(depth) => Ok(Some(depth)),
        Err(BusError::UnknownQueue(_)) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::*;

    #[pg_test]
    fn queue_depth_counts_what_this_transaction_sees_and_refuses_bad_arguments() {
        run("SELECT bussig.create_queue('d')");
        run("SELECT bussig.send_batch('d', ARRAY['1', '2', '3']::jsonb[])");
        assert_eq!(one::<i64>("SELECT bussig.queue_depth('d')"), Some(3));
        // A failed statement takes its send with it.
        assert_fails("SELECT bussig.send('d', '4'), 1 / 0", "22012");
        assert_eq!(one::<i64>("SELECT bussig.queue_depth('d')"), Some(3));
        read_into_got("d");
        run("SELECT bussig.ack('d', message_id, lock_token) FROM got");
        assert_eq!(one::<i64>("SELECT bussig.queue_depth('d')"), Some(2));
        assert_all_fail(&[
            ("SELECT bussig.queue_depth(NULL)", "22004"),
            ("SELECT bussig.queue_depth('_d')", "22023"),
            ("SELECT bussig.queue_depth('nope')", "42704"),
            ("SELECT bussig.queue_depth_if_exists(NULL)", "22004"),
            ("SELECT bussig.queue_depth_if_exists('_d')", "22023"),
        ]);
        assert_eq!(
            one::<i64>("SELECT bussig.queue_depth_if_exists('d')"),
            Some(2)
        );
        assert_eq!(
            one::<i64>("SELECT bussig.queue_depth_if_exists('nope')"),
            None
        );
    }
}
