//! Messages in queues: sending, receiving, settling, dead-lettering and peeking. Each verb is one kept
//! statement in the common case; the queue is named in the statement itself so that no separate
//! look-up precedes the work, and only an empty result pays for finding out why (unknown queue, stale
//! token, duplicate). The SQL functions are in `api/messages.rs`.
// The domain is written against SPI and `pg`: no unsafe code of its own.
#![deny(unsafe_code)]

/// The group a message of alias `by_id` counts in, NULL when in none (a dead letter keeps its group's
/// name but not its place): what a statement that removes messages returns for `group::leave`.
macro_rules! counted_group {
    () => {
        "CASE WHEN by_id.group_seq IS NOT NULL THEN by_id.group_id END"
    };
}

pub mod dead_letter;
pub mod group;
pub mod in_flight;
pub mod peek;
pub mod read_position;
pub mod receive;
pub mod reply;
pub mod send;
pub mod settle;
#[cfg(any(test, feature = "pg_test"))]
mod tests {
    mod groups;
    mod in_flight;
    mod receive;
    mod send;
    mod settle;
}

use pgrx::spi::SpiClient;

use crate::error::{BusError, BusResult};
use crate::queue;

/// A statement that found nothing: the queue must exist, otherwise the answer is simply "no".
fn nothing_done<T>(client: &mut SpiClient<'_>, queue: &str, answer: T) -> BusResult<T> {
    queue::require(client, queue)?;
    Ok(answer)
}

/// A message whose payload is in neither its row nor the body row it was published with.
fn missing_body(message_id: i64, queue: &str) -> BusError {
    BusError::Corrupt(format!(
        "message {message_id} of queue \"{queue}\" has no payload: the body row it was published with is gone"
    ))
}
