//! run_maintenance, ensure_worker and invalidate_routing: the worker's steps on demand, its start,
//! and the invalidation the triggers on queues and subscriptions call.
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::error::BusResult;

/// Every step once, in the caller's transaction; pending fan-outs are delivered completely.
#[pg_extern]
fn run_maintenance() -> Result<pgrx::JsonB, ErrorReport> {
    crate::access::require_owner("run_maintenance")?;
    // `connect` turns jit off for the steps' full scans and back to the caller's setting after.
    let done = crate::access::connect(|client, _| -> BusResult<serde_json::Value> {
        crate::worker::maintenance::run_all(client)
    })?;
    Ok(pgrx::JsonB(done))
}

/// Called at CREATE EXTENSION: says once when no worker will run, and otherwise asks the launcher
/// to start this database's worker now rather than at its next round.
#[pg_extern]
fn ensure_worker() -> &'static str {
    crate::worker::ensure()
}

/// Called by the triggers on queues and subscriptions: every backend drops its cached routes and
/// queues.
#[pg_extern]
fn invalidate_routing() -> Result<(), ErrorReport> {
    crate::pg::invalidation::invalidate_routing()
}
