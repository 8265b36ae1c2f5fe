//! One error type for every call: each SQLSTATE bussig documents becomes a variant, with the server's
//! message kept, so that callers can match on what went wrong without parsing text.
use tokio_postgres::error::SqlState;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 42704: no such queue, stream, consumer group (or role).
    #[error("{0}")]
    UnknownQueue(String),
    /// 22023: an argument breaks a rule (a queue, stream or group name, a subject, a batch size, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// 22004: NULL where a value is needed.
    #[error("{0}")]
    NullArgument(String),
    /// 54000: a message larger than bussig.max_message_size.
    #[error("{0}")]
    TooLarge(String),
    /// 42501: the role lacks the privilege on the queue.
    #[error("{0}")]
    PermissionDenied(String),
    /// 55000: the queue is not in a state that allows the call (e.g. it has no dead-letter queue).
    #[error("{0}")]
    NotInState(String),
    /// 2BP01: other queues still send their dead letters to this one.
    #[error("{0}")]
    InUse(String),
    /// 0A000: not supported (e.g. a prepared transaction after a NOTIFY).
    #[error("{0}")]
    NotSupported(String),
    /// The database has no bussig (undefined schema, table or function).
    #[error("bussig is not installed in this database: {0}")]
    NoExtension(String),
    /// No reply came within the time a `request` allowed.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// A payload that does not decode into the type asked for, or does not encode.
    #[error("payload: {0}")]
    Payload(#[from] serde_json::Error),
    /// Anything else the database or the connection reported.
    #[error(transparent)]
    Database(tokio_postgres::Error),
}

impl Error {
    /// Whether the connection itself failed (closed, reset, unreachable, or ended by the server:
    /// pg_terminate_backend, a shutdown, a pooler losing its server): worth a reconnect.
    pub fn is_connection(&self) -> bool {
        match self {
            Error::Database(e) => match e.as_db_error() {
                None => true,
                // Class 08: connection exception; 57P01 to 57P03: the server ended it or is starting.
                Some(db) => {
                    e.is_closed()
                        || db.code().code().starts_with("08")
                        || db.code().code().starts_with("57P")
                }
            },
            _ => false,
        }
    }

    /// Whether the call failed on its own and may simply be made again on the same connection: it was
    /// cancelled (a `statement_timeout`, 57014), or lost a serialization race or a deadlock (40001,
    /// 40P01). Its transaction rolled back, acks with it.
    pub fn is_transient(&self) -> bool {
        let Error::Database(e) = self else {
            return false;
        };
        e.as_db_error().is_some_and(|db| {
            [
                SqlState::QUERY_CANCELED,
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
            ]
            .contains(db.code())
        })
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            return Error::Database(e);
        };
        let message = db.message().to_string();
        let code = db.code();
        match code {
            c if *c == SqlState::UNDEFINED_OBJECT => Error::UnknownQueue(message),
            c if *c == SqlState::INVALID_PARAMETER_VALUE => Error::InvalidArgument(message),
            c if *c == SqlState::NULL_VALUE_NOT_ALLOWED => Error::NullArgument(message),
            c if *c == SqlState::PROGRAM_LIMIT_EXCEEDED => Error::TooLarge(message),
            c if *c == SqlState::INSUFFICIENT_PRIVILEGE => Error::PermissionDenied(message),
            c if *c == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE => Error::NotInState(message),
            c if *c == SqlState::DEPENDENT_OBJECTS_STILL_EXIST => Error::InUse(message),
            c if *c == SqlState::FEATURE_NOT_SUPPORTED => Error::NotSupported(message),
            c if *c == SqlState::INVALID_SCHEMA_NAME
                || *c == SqlState::UNDEFINED_TABLE
                || *c == SqlState::UNDEFINED_FUNCTION =>
            {
                Error::NoExtension(message)
            }
            _ => Error::Database(e),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
