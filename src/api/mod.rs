//! The SQL surface: every `#[pg_extern]` lives below this module.
mod depth;
mod grants;
mod lock_token;
mod messages;
mod queues;
mod streams;
mod superseded;
mod topics;
mod worker;
