//! Topics: subscriptions route every message published on a matching NATS subject into a queue,
//! once per queue however many of its patterns match. Matching itself is `routing` (pure Rust);
//! `routes` keeps each backend's copy of the subscriptions. The SQL functions are in `api/topics.rs`.
// The domain is written against SPI and `pg`: no unsafe code of its own.
#![deny(unsafe_code)]
pub mod publish;
pub mod routes;
pub mod subscription;
#[cfg(any(test, feature = "pg_test"))]
mod tests;

use crate::error::{BusError, BusResult};
use crate::routing;
use crate::validate::required;

pub fn checked_subject(subject: Option<&str>) -> BusResult<&str> {
    let subject = required(subject, "subject")?;
    routing::check_subject(subject).map_err(|why| BusError::InvalidSubject {
        subject: subject.into(),
        why,
    })?;
    Ok(subject)
}

pub fn checked_pattern(pattern: Option<&str>) -> BusResult<&str> {
    let pattern = required(pattern, "pattern")?;
    routing::check_pattern(pattern).map_err(|why| BusError::InvalidPattern {
        pattern: pattern.into(),
        why,
    })?;
    Ok(pattern)
}
