//! How a handler says it did not finish its message: retry, dead-letter, or an error.
use std::time::Duration;

/// Why a handler did not finish its message. Any error converts into `Failure::Error` with `?`: the
/// message is then nacked with the queue's backoff and the error's text.
#[derive(Debug)]
pub enum Failure {
    /// Try again after `delay` (the queue's backoff when None).
    Retry {
        delay: Option<Duration>,
        error: String,
    },
    /// Never again: to the dead-letter queue with this reason.
    DeadLetter {
        reason: String,
        error: Option<String>,
    },
    /// An error: nacked with the queue's backoff.
    Error(String),
}

impl Failure {
    pub fn retry_after(delay: Duration) -> Self {
        Failure::Retry {
            delay: Some(delay),
            error: format!("retry after {delay:?}"),
        }
    }

    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Failure::DeadLetter {
            reason: reason.into(),
            error: None,
        }
    }

    /// A handler's panic as an error, with the panic's message.
    pub(crate) fn from_panic(panic: &(dyn std::any::Any + Send)) -> Self {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the handler panicked".into());
        Failure::Error(format!("panic: {text}"))
    }

    /// What went wrong, in words.
    pub(crate) fn text(&self) -> &str {
        match self {
            Failure::Retry { error, .. } | Failure::Error(error) => error,
            Failure::DeadLetter { reason, error } => error.as_deref().unwrap_or(reason),
        }
    }
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure::Error(error.to_string())
    }
}
