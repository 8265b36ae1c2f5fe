//! Topic routing by NATS subjects: which subscription patterns a published subject reaches.
//! Pure Rust, no PostgreSQL, so it is tested with plain `cargo test`.
#![forbid(unsafe_code)]

pub mod index;
pub mod subject;

pub use index::PatternIndex;
pub use subject::{check_pattern, check_subject, SubjectError};
