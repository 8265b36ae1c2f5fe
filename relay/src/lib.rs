//! bussig-relay: moves messages from bussig queues to NATS JetStream (`[[route]]`, see `relay.rs`)
//! and from JetStream consumers into bussig (`[[inbound]]`, see `inbound.rs`), each landing exactly
//! once. Every bussig call goes through `bussig-client`.
//!
//! The binary (`main.rs`) reads the arguments and the configuration and calls `run` with a shutdown
//! future that resolves on SIGTERM or SIGINT.

pub mod bus;
mod checks;
pub mod config;
mod http;
mod inbound;
mod incoming;
mod lanes;
mod metrics;
mod publish;
mod relay;
mod start;
mod subject;

pub use config::{Config, ConfigError, LogFormat};
pub use start::{run, StartError};
