//! Every failure the SQL API can report, each with the SQLSTATE clients branch on.
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgSqlErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("{0} must not be NULL")]
    NullArgument(&'static str),

    #[error("invalid queue name {name:?}: {why}")]
    InvalidQueueName { name: String, why: &'static str },

    #[error("invalid {what}: {why}")]
    InvalidArgument { what: &'static str, why: String },

    #[error("invalid subject {subject:?}: {why}")]
    InvalidSubject {
        subject: String,
        why: crate::routing::SubjectError,
    },

    #[error("invalid pattern {pattern:?}: {why}")]
    InvalidPattern {
        pattern: String,
        why: crate::routing::SubjectError,
    },

    #[error("queue \"{0}\" does not exist")]
    UnknownQueue(String),

    #[error("message of {size} bytes is larger than bussig.max_message_size ({limit} bytes)")]
    MessageTooLarge { size: usize, limit: i32 },

    #[error("{0} is not supported yet")]
    NotSupported(&'static str),

    #[error("queue \"{queue}\" is the dead-letter queue of {users}")]
    DeadLetterQueueInUse { queue: String, users: String },

    #[error("queue \"{0}\" is a dead-letter queue and has none of its own")]
    NoDeadLetterQueue(String),

    #[error("message {message_id} of queue \"{queue}\" names no reply_to queue")]
    NoReplyTo { queue: String, message_id: i64 },

    #[error("permission denied for queue \"{queue}\": role \"{role}\" lacks {privilege}")]
    PermissionDenied {
        /// send, consume or manage (bussig.grant), any privilege, create (bussig.grant_create_queues), or ownership
        privilege: &'static str,
        queue: String,
        role: String,
    },

    #[error("permission denied: only the owner of extension bussig may call {0}")]
    OwnerOnly(&'static str),

    #[error("role \"{0}\" does not exist")]
    UnknownRole(String),

    #[error("invalid {what} name {name:?}: {why}")]
    InvalidName {
        what: &'static str,
        name: String,
        why: &'static str,
    },

    #[error("stream \"{0}\" does not exist")]
    UnknownStream(String),

    #[error("consumer group \"{group}\" of stream \"{stream}\" does not exist")]
    UnknownConsumerGroup { stream: String, group: String },

    #[error("permission denied for stream \"{stream}\": role \"{role}\" lacks {privilege}")]
    StreamPermissionDenied {
        /// append, read or manage (bussig.grant), create, or ownership
        privilege: &'static str,
        stream: String,
        role: String,
    },

    /// bussig's own rows disagree with each other (a body row deleted by hand, say).
    #[error("{0}")]
    Corrupt(String),

    #[error("internal SPI error: {0}")]
    Spi(#[from] pgrx::spi::SpiError),
}

impl BusError {
    pub fn invalid(what: &'static str, why: impl Into<String>) -> Self {
        BusError::InvalidArgument {
            what,
            why: why.into(),
        }
    }

    fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            BusError::NullArgument(_) => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            BusError::InvalidQueueName { .. }
            | BusError::InvalidArgument { .. }
            | BusError::InvalidSubject { .. }
            | BusError::InvalidPattern { .. }
            | BusError::InvalidName { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            BusError::UnknownQueue(_)
            | BusError::UnknownRole(_)
            | BusError::UnknownStream(_)
            | BusError::UnknownConsumerGroup { .. } => ERRCODE_UNDEFINED_OBJECT,
            BusError::PermissionDenied { .. }
            | BusError::OwnerOnly(_)
            | BusError::StreamPermissionDenied { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            BusError::MessageTooLarge { .. } => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            BusError::NotSupported(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            BusError::DeadLetterQueueInUse { .. } => ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            BusError::NoDeadLetterQueue(_) | BusError::NoReplyTo { .. } => {
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            BusError::Corrupt(_) => ERRCODE_DATA_CORRUPTED,
            BusError::Spi(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            BusError::InvalidQueueName { .. } => Some(
                "Queue names are 1-60 letters, digits, '_', '-' or '.', starting with a letter or digit."
                    .into(),
            ),
            BusError::InvalidName { .. } => Some(
                "Names are 1-60 letters, digits, '_', '-' or '.', starting with a letter or digit."
                    .into(),
            ),
            BusError::UnknownStream(name) => Some(format!(
                "Create it with SELECT bussig.create_stream('{name}')."
            )),
            BusError::StreamPermissionDenied { privilege: "ownership" | "create", .. } => Some(
                "Only the stream's owner, the owner of extension bussig or a superuser can.".into(),
            ),
            BusError::StreamPermissionDenied { privilege, stream, role } => Some(format!(
                "The stream's owner can allow it: SELECT bussig.grant('{stream}', '{role}', ARRAY['{privilege}'])."
            )),
            BusError::InvalidSubject { .. } => Some(
                "A subject is 1-16 dot-separated tokens of printable ASCII, at most 255 bytes, without wildcards."
                    .into(),
            ),
            BusError::InvalidPattern { .. } => Some(
                "A pattern is a subject whose tokens may be '*' (one token) or, last, '>' (one or more tokens)."
                    .into(),
            ),
            BusError::UnknownQueue(name) => Some(format!(
                "Create it with SELECT bussig.create_queue('{name}'), or set bussig.auto_create_queues = on."
            )),
            BusError::MessageTooLarge { .. } => Some(
                "Store large bodies in a table and send a reference, or raise bussig.max_message_size."
                    .into(),
            ),
            BusError::DeadLetterQueueInUse { .. } => {
                Some("Drop those queues first, or point them at another dead-letter queue with alter_queue.".into())
            }
            BusError::NoDeadLetterQueue(name) => Some(format!(
                "redrive and dead_letter take the source queue; give queue \"{name}\" a dead-letter queue with alter_queue if it needs one."
            )),
            BusError::NoReplyTo { .. } => Some(
                "Send requests with reply_to => 'the queue replies go to'; ack a message that needs no reply."
                    .into(),
            ),
            BusError::PermissionDenied { privilege: "create", role, .. } => Some(format!(
                "The owner of extension bussig can allow it: SELECT bussig.grant_create_queues('{role}')."
            )),
            BusError::PermissionDenied { privilege: "ownership", .. } => Some(
                "Only the queue's owner, the owner of extension bussig or a superuser can.".into(),
            ),
            BusError::PermissionDenied { privilege: crate::access::ANY_PRIVILEGE, queue, role } => Some(format!(
                "The queue's owner can grant one: SELECT bussig.grant('{queue}', '{role}', ARRAY['consume'])."
            )),
            BusError::PermissionDenied { privilege, queue, role } => Some(format!(
                "The queue's owner can allow it: SELECT bussig.grant('{queue}', '{role}', ARRAY['{privilege}'])."
            )),
            _ => None,
        }
    }
}

impl From<BusError> for ErrorReport {
    fn from(err: BusError) -> Self {
        let hint = err.hint();
        let report = ErrorReport::new(err.sqlstate(), err.to_string(), "bussig");
        match hint {
            Some(hint) => report.set_hint(hint),
            None => report,
        }
    }
}

pub type BusResult<T> = Result<T, BusError>;
