//! Settings, all under `bussig.*`.
use std::ffi::{CStr, CString};

use pgrx::{pg_sys, GucContext, GucFlags, GucRegistry, GucSetting};

/// Lets `send` create an unknown queue with default settings instead of failing with 42704. Off by
/// default because a typo in a queue name should be an error, not a new queue nobody reads.
pub static AUTO_CREATE_QUEUES: GucSetting<bool> = GucSetting::<bool>::new(false);

/// The largest payload plus headers one message may carry, in bytes. Large bodies belong in a table
/// or object store with a reference in the message; this keeps one bad producer from filling the queue.
/// Superuser-only so that a client cannot raise its own limit.
pub static MAX_MESSAGE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);

/// A publish that reaches more queues than this hands the fan-out to the background worker, which
/// inserts the messages after commit: the publisher's transaction stays short however many queues
/// subscribe. Smaller fan-outs are written in the publishing transaction.
pub static INLINE_FANOUT_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(16);

/// How often the worker runs its maintenance steps (lock and TTL expiry, key pruning, ephemeral
/// queues, body collection). Fan-outs do not wait for it: a commit wakes the worker at once.
pub static MAINTENANCE_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// How often the worker recounts the messages of every queue, for bussig.queues to show large queues
/// without counting them on each look. One pass over the message table per interval, or per 20 times
/// the last pass's duration when that is longer (at most 50 s), so a huge backlog does not keep the
/// worker busy.
pub static STATS_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// Databases the worker serves, comma-separated; empty serves every database with the extension.
/// Lets a cluster with many databases keep worker processes where bussig is used.
pub static WORKER_DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn register() {
    GucRegistry::define_bool_guc(
        c"bussig.auto_create_queues",
        c"send creates unknown queues with default settings.",
        c"When off (the default), sending to an unknown queue raises SQLSTATE 42704.",
        &AUTO_CREATE_QUEUES,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"bussig.max_message_size",
        c"Largest payload plus headers of one message.",
        c"Larger messages raise SQLSTATE 54000.",
        &MAX_MESSAGE_SIZE,
        1024,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"bussig.inline_fanout_limit",
        c"Largest fan-out a publish writes itself; larger ones go to the worker.",
        c"Without the background worker every fan-out is written by the publish.",
        &INLINE_FANOUT_LIMIT,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"bussig.maintenance_interval",
        c"Time between two rounds of the background worker's maintenance.",
        c"",
        &MAINTENANCE_INTERVAL,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"bussig.stats_interval",
        c"Time between two counts of every queue's messages by the background worker.",
        c"bussig.queues splits the messages of queues over 10,000 by these counts; smaller ones are counted in the round after each change.",
        &STATS_INTERVAL,
        100,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"bussig.worker_databases",
        c"Databases the background worker serves (comma-separated; empty: all with the extension).",
        c"",
        &WORKER_DATABASES,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // A misspelt `SET bussig.max_mesage_size` is then an error (42602), not a setting nobody reads.
    // SAFETY: _PG_init runs single-threaded; PostgreSQL copies the name.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"bussig".as_ptr()) };
}

/// Sets a setting through the GUC API, as a SET statement would without being parsed: `GUC_ACTION_LOCAL`
/// until the end of the transaction, `GUC_ACTION_SAVE` until the enclosing GUC nest level ends.
pub fn set(name: &CStr, value: &CStr, action: pg_sys::GucAction::Type) {
    set_in(name, value, pg_sys::GucContext::PGC_USERSET, action);
}

/// `set`, in the context of a caller entitled to `context` (PGC_SUSET: a superuser's).
fn set_in(
    name: &CStr,
    value: &CStr,
    context: pg_sys::GucContext::Type,
    action: pg_sys::GucAction::Type,
) {
    // SAFETY: both names are NUL-terminated and copied by PostgreSQL; an invalid value raises an
    // ERROR, not undefined behaviour.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            context,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            0,
            false,
        );
    }
}

/// Runs `work` with setting `name`, one only a superuser may set, at `value`, and puts it back after
/// (a GUC nest level of its own; an error's abort puts it back too). For bussig's own statements,
/// never for a caller's.
pub fn with_superuser_setting<T>(name: &CStr, value: &CStr, work: impl FnOnce() -> T) -> T {
    // SAFETY: inside a transaction; the level is closed below, or by the abort of an error.
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    // The superuser context is bussig's own: the caller was checked to run maintenance.
    set_in(
        name,
        value,
        pg_sys::GucContext::PGC_SUSET,
        pg_sys::GucAction::GUC_ACTION_SAVE,
    );
    let done = work();
    // SAFETY: the level opened above in this transaction, closed once.
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    done
}
