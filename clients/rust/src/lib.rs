//! bussig-client: send to bussig queues in the application's own transactions, and consume them with a
//! framework that acks, retries, dead-letters, extends locks and shuts down without losing anything.
//! Streams too: append to them in those transactions, and read them as members of consumer groups
//! (`StreamConsumer`).
//!
//! ```no_run
//! # async fn example(client: &tokio_postgres::Client) -> bussig_client::Result<()> {
//! use bussig_client::{send, SendOptions};
//! let id = send(client, "emails", &serde_json::json!({"to": "a@example.com"}), &SendOptions::new()).await?;
//! # Ok(()) }
//! ```
mod broadcast;
mod bus;
mod connection;
mod consumer;
mod delivery;
mod ephemeral;
mod error;
mod failure;
mod queues;
mod request;
mod send;
mod settle_batch;
mod sql;
mod streams;
mod trace;
mod transactional;

pub use broadcast::Broadcast;
pub use bus::Bus;
pub use connection::{connect_no_tls, Connector};
pub use consumer::{Consumer, Stats};
pub use delivery::{
    ack, ack_and_read, ack_batch, dead_letter, extend_lock, nack, queue_depth, read, reply, stream,
    Message,
};
pub use error::{Error, Result};
pub use failure::Failure;
pub use queues::{queues, retry_backoff, subscribers, QueueInfo};
pub use request::{Reply, Requester};
pub use send::{publish, send, send_batch, SendOptions};
pub use settle_batch::{extend_lock_batch, nack_batch};
pub use streams::{
    append, append_batch, stream_commit, stream_extend_lease, stream_read, stream_release,
    stream_seek, stream_seek_time, AppendOptions, AppendRecord, StreamConsumer, StreamRecord,
    StreamStats,
};
pub use tokio_util::sync::CancellationToken;
pub use transactional::TransactionalFuture;
