//! The SQL surface: every `#[pg_extern]` lives below this module.

/// Emits the `#[pg_extern] fn` of a single send (send, publish): its destination `$to`, checked by
/// `$check`, then the message's arguments, checked and handed with it to `$run`. A whole item, since
/// `#[pg_extern]` reads the parameters before any macro among them expands; the return type comes
/// as plain tokens (a `ty` fragment would change how pgrx's SQL comment spells it).
macro_rules! sends_one {
    (
        $(#[$($attr:tt)*])*
        fn $name:ident($to:ident) -> $ret:ident $(<$ret_arg:ident>)? = $check:path, $run:expr
    ) => {
        $(#[$($attr)*])*
        #[allow(clippy::too_many_arguments)]
        #[pg_extern]
        fn $name(
            $to: Option<&str>,
            payload: Option<Jsonb>,
            headers: default!(Option<Jsonb>, "NULL"),
            delay: default!(Option<Interval>, "NULL"),
            priority: default!(Option<i32>, 0),
            dedup_id: default!(Option<&str>, "NULL"),
            correlation_id: default!(Option<&str>, "NULL"),
            reply_to: default!(Option<&str>, "NULL"),
            group_id: default!(Option<&str>, "NULL"),
        ) -> Result<$ret $(<$ret_arg>)?, ErrorReport> {
            let $to = $check($to)?;
            let outgoing = Outgoing::check(payload, headers, delay, priority)?;
            let extras = Extras {
                dedup_id,
                correlation_id,
                reply_to,
                group_id: $crate::validate::group_id(group_id)?,
            };
            Ok(($run)($to, outgoing, extras)?)
        }
    };
}

/// Emits a `#[pg_extern] fn` returning a table of the columns given. A whole item, since
/// `#[pg_extern]` reads the return type before any macro in it expands: the shared column lists of
/// `returns_messages!` and `returns_records!` come in through here.
macro_rules! returns_table {
    (
        $(#[$($attr:tt)*])*
        fn $name:ident($($params:tt)*) -> ($($columns:tt)*) $body:tt
    ) => {
        $(#[$($attr)*])*
        #[allow(clippy::type_complexity)]
        #[pg_extern]
        fn $name($($params)*) -> Result<TableIterator<'static, ($($columns)*)>, ErrorReport> $body
    };
}
use returns_table;

mod depth;
mod grants;
mod lock_token;
mod messages;
mod queues;
mod streams;
mod superseded;
mod topics;
mod worker;
