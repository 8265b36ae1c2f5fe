//! The SQL surface: every `#[pg_extern]` lives below this module.
mod depth;
mod grants;
mod lock_token;
mod messages;
mod queues;
mod read_position;
mod superseded;
mod topics;

pub use messages::{bury, Dead};
pub use queues::drop_queue_by_id;

#[cfg(any(test, feature = "pg_test"))]
mod test_support;
#[cfg(any(test, feature = "pg_test"))]
mod tests;
#[cfg(any(test, feature = "pg_test"))]
mod topic_tests;
