//! Argument checks shared by every SQL function, so each raises the same SQLSTATE for the same mistake.
#![forbid(unsafe_code)]

use pgrx::datum::Interval;

use crate::error::{BusError, BusResult};

pub const MAX_QUEUE_NAME_LEN: usize = 60;
pub const MAX_BATCH: i32 = 1000;

/// A required argument: NULL raises 22004 naming it.
pub fn required<T>(value: Option<T>, what: &'static str) -> BusResult<T> {
    value.ok_or(BusError::NullArgument(what))
}

pub const MAX_GROUP_ID_LEN: usize = 256;

/// A message group's id: NULL (no group) or 1 to 256 bytes, so that it fits the group index.
pub fn group_id(group_id: Option<&str>) -> BusResult<Option<&str>> {
    match group_id {
        Some("") => Err(BusError::invalid("group_id", "it is empty")),
        Some(id) if id.len() > MAX_GROUP_ID_LEN => Err(BusError::invalid(
            "group_id",
            format!("it is longer than {MAX_GROUP_ID_LEN} bytes"),
        )),
        group_id => Ok(group_id),
    }
}

/// Checks a queue name and hands it back, so that only checked names travel further.
pub fn queue_name(name: Option<&str>) -> BusResult<&str> {
    let name = required(name, "queue")?;
    let invalid = |why| {
        Err(BusError::InvalidQueueName {
            name: name.to_string(),
            why,
        })
    };
    let Some(first) = name.chars().next() else {
        return invalid("it is empty");
    };
    if name.len() > MAX_QUEUE_NAME_LEN {
        return invalid("it is longer than 60 characters");
    }
    if !first.is_ascii_alphanumeric() {
        return invalid("it must start with a letter or digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return invalid("it may contain only letters, digits, '_', '-' and '.'");
    }
    Ok(name)
}

/// Interval length as PostgreSQL compares intervals (a month is 30 days, a day 24 hours).
fn micros(interval: &Interval) -> i128 {
    interval.as_micros()
}

/// The longest interval any argument takes. Times are now plus or minus an interval, and PostgreSQL's
/// timestamps end in 4713 BC: a longer one would break every later statement that computes with it,
/// the worker's among them.
const MAX_INTERVAL_YEARS: i128 = 1000;

fn at_most_max(interval: &Interval, what: &'static str) -> BusResult<()> {
    const MICROS_PER_YEAR: i128 = 366 * 24 * 3600 * 1_000_000;
    // Each part on its own too: timestamp arithmetic adds months, days and time one after another.
    let parts = [
        micros(interval),
        interval.months() as i128 * 31 * 24 * 3600 * 1_000_000,
        interval.days() as i128 * 24 * 3600 * 1_000_000,
        interval.micros() as i128,
    ];
    if parts
        .iter()
        .any(|part| part.abs() > MAX_INTERVAL_YEARS * MICROS_PER_YEAR)
    {
        return Err(BusError::invalid(
            what,
            format!("it must not be longer than {MAX_INTERVAL_YEARS} years"),
        ));
    }
    Ok(())
}

pub fn not_negative(interval: &Interval, what: &'static str) -> BusResult<()> {
    if micros(interval) < 0 {
        return Err(BusError::invalid(what, "it must not be negative"));
    }
    at_most_max(interval, what)
}

pub fn positive(interval: &Interval, what: &'static str) -> BusResult<()> {
    if micros(interval) <= 0 {
        return Err(BusError::invalid(what, "it must be positive"));
    }
    at_most_max(interval, what)
}

pub fn is_zero(interval: &Interval) -> bool {
    micros(interval) == 0
}

pub fn at_most(
    first: &Interval,
    second: &Interval,
    what: &'static str,
    why: &str,
) -> BusResult<()> {
    if micros(first) > micros(second) {
        return Err(BusError::invalid(what, why));
    }
    Ok(())
}

/// The max_messages of read and peek: 1 to MAX_BATCH.
pub fn max_messages(value: Option<i32>) -> BusResult<i32> {
    let value = required(value, "max_messages")?;
    if !(1..=MAX_BATCH).contains(&value) {
        return Err(BusError::invalid(
            "max_messages",
            format!("{value} is not between 1 and {MAX_BATCH}"),
        ));
    }
    Ok(value)
}

/// An optional lock_timeout override: positive when given.
pub fn lock_timeout(value: Option<Interval>) -> BusResult<Option<Interval>> {
    if let Some(lock_timeout) = &value {
        positive(lock_timeout, "lock_timeout")?;
    }
    Ok(value)
}

/// An optional delay: not negative when given.
pub fn delay(value: Option<Interval>) -> BusResult<Option<Interval>> {
    if let Some(delay) = &value {
        not_negative(delay, "delay")?;
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names() {
        for good in ["a", "Orders", "orders.v2", "0-job_x", &"q".repeat(60)] {
            assert_eq!(queue_name(Some(good)).unwrap(), good);
        }
        for bad in [
            "",
            "_a",
            "-a",
            ".a",
            "a b",
            "a'b",
            "a;b",
            "ä",
            "a/b",
            &"q".repeat(61),
        ] {
            assert!(
                matches!(
                    queue_name(Some(bad)),
                    Err(BusError::InvalidQueueName { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            queue_name(None),
            Err(BusError::NullArgument("queue"))
        ));
    }
}
