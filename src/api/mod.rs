//! The SQL surface: every `#[pg_extern]` lives below this module.
mod messages;
mod queues;

#[cfg(any(test, feature = "pg_test"))]
mod tests;
