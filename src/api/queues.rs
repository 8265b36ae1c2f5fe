//! create_queue, alter_queue, drop_queue and purge_queue.
use pgrx::datum::Interval;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::access;
use crate::error::BusResult;
use crate::queue::{self, SettingsChange};
use crate::validate;

/// Refuses an explicit NULL for a setting that has a default: NULL there is almost always a bug.
fn setting<T>(value: Option<T>, what: &'static str) -> BusResult<Option<T>> {
    validate::required(value, what).map(Some)
}

#[allow(clippy::too_many_arguments)]
#[pg_extern]
fn create_queue(
    queue: Option<&str>,
    max_deliveries: default!(Option<i32>, 5),
    lock_timeout: default!(Option<Interval>, "'30 seconds'"),
    message_ttl: default!(Option<Interval>, "NULL"),
    retry_delay: default!(Option<Interval>, "'1 second'"),
    retry_delay_max: default!(Option<Interval>, "'15 minutes'"),
    retry_multiplier: default!(Option<f64>, 2.0),
    dedup_window: default!(Option<Interval>, "'5 minutes'"),
    dead_letter_queue: default!(Option<&str>, "NULL"),
    notify: default!(Option<bool>, false),
    max_in_flight: default!(Option<i32>, "NULL"),
) -> Result<bool, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let change = SettingsChange {
        max_deliveries: setting(max_deliveries, "max_deliveries")?,
        lock_timeout: setting(lock_timeout, "lock_timeout")?,
        message_ttl,
        retry_delay: setting(retry_delay, "retry_delay")?,
        retry_delay_max: setting(retry_delay_max, "retry_delay_max")?,
        retry_multiplier: setting(retry_multiplier, "retry_multiplier")?,
        dedup_window: setting(dedup_window, "dedup_window")?,
        notify: setting(notify, "notify")?,
        max_in_flight,
    };
    Ok(access::connect(|client, caller| {
        queue::create(client, caller, queue, change, dead_letter_queue)
    })?)
}

#[allow(clippy::too_many_arguments)]
#[pg_extern]
fn alter_queue(
    queue: Option<&str>,
    max_deliveries: default!(Option<i32>, "NULL"),
    lock_timeout: default!(Option<Interval>, "NULL"),
    message_ttl: default!(Option<Interval>, "NULL"),
    retry_delay: default!(Option<Interval>, "NULL"),
    retry_delay_max: default!(Option<Interval>, "NULL"),
    retry_multiplier: default!(Option<f64>, "NULL"),
    dedup_window: default!(Option<Interval>, "NULL"),
    dead_letter_queue: default!(Option<&str>, "NULL"),
    notify: default!(Option<bool>, "NULL"),
    max_in_flight: default!(Option<i32>, "NULL"),
) -> Result<(), ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let change = SettingsChange {
        max_deliveries,
        lock_timeout,
        message_ttl,
        retry_delay,
        retry_delay_max,
        retry_multiplier,
        dedup_window,
        notify,
        max_in_flight,
    };
    Ok(access::connect(|client, caller| {
        queue::alter(client, caller, queue, change, dead_letter_queue)
    })?)
}

#[pg_extern]
fn drop_queue(queue: Option<&str>) -> Result<bool, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    Ok(access::connect(|client, caller| {
        queue::drop(client, caller, queue)
    })?)
}

#[pg_extern]
fn purge_queue(queue: Option<&str>) -> Result<i64, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    Ok(access::connect(|client, caller| {
        queue::purge(client, caller, queue)
    })?)
}
