//! subscribe_stream and unsubscribe_stream: which subjects `publish` appends to a stream.
use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use super::{require, StreamPrivilege};
use crate::access::Caller;
use crate::error::BusResult;
use crate::plans::{self, Statement};

static SUBSCRIBE: Statement = Statement {
    sql: "INSERT INTO bussig.stream_subscription (stream_id, pattern) VALUES ($1, $2)
          ON CONFLICT DO NOTHING RETURNING true",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

static UNSUBSCRIBE: Statement = Statement {
    sql: "DELETE FROM bussig.stream_subscription WHERE stream_id = $1 AND pattern = $2 RETURNING true",
    args: &[pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

/// True when the subscription is new.
pub fn subscribe(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    pattern: &str,
) -> BusResult<bool> {
    change(client, caller, name, pattern, &SUBSCRIBE)
}

/// True when there was such a subscription.
pub fn unsubscribe(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    pattern: &str,
) -> BusResult<bool> {
    change(client, caller, name, pattern, &UNSUBSCRIBE)
}

/// Runs `statement` for stream `name` and `pattern`, as one who may manage the stream: whether it
/// changed a row.
fn change(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    pattern: &str,
    statement: &'static Statement,
) -> BusResult<bool> {
    let stream = require(client, caller, name, StreamPrivilege::Manage)?;
    let args = [stream.stream_id.into(), pattern.into()];
    Ok(plans::first_value::<bool>(client, statement, &args)?.is_some())
}
