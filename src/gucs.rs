//! Settings, all under `bussig.*`.
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Lets `send` create an unknown queue with default settings instead of failing with 42704. Off by
/// default because a typo in a queue name should be an error, not a new queue nobody reads.
pub static AUTO_CREATE_QUEUES: GucSetting<bool> = GucSetting::<bool>::new(false);

/// The largest payload plus headers one message may carry, in bytes. Large bodies belong in a table
/// or object store with a reference in the message; this keeps one bad producer from filling the queue.
/// Superuser-only so that a client cannot raise its own limit.
pub static MAX_MESSAGE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);

pub fn register() {
    GucRegistry::define_bool_guc(
        c"bussig.auto_create_queues",
        c"send creates unknown queues with default settings.",
        c"When off (the default), sending to an unknown queue raises SQLSTATE 42704.",
        &AUTO_CREATE_QUEUES,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"bussig.max_message_size",
        c"Largest payload plus headers of one message.",
        c"Larger messages raise SQLSTATE 54000.",
        &MAX_MESSAGE_SIZE,
        1024,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
}
