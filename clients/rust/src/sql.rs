//! Every statement runs as an unnamed prepared statement with its parameter types given
//! (`query_typed`): no named statement outlives its transaction, so the client also works through a
//! transaction-pooling proxy such as pgbouncer.
use std::time::Duration;

use bytes::BufMut;
use tokio_postgres::types::{accepts, to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{GenericClient, Row};

use crate::error::{Error, Result};

pub(crate) async fn query<C: GenericClient>(
    client: &C,
    sql: &str,
    types: &[Type],
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>> {
    Ok(client.query_typed(sql, &typed(types, params)).await?)
}

/// The one row `sql` returns.
pub(crate) async fn query_one<C: GenericClient>(
    client: &C,
    sql: &str,
    types: &[Type],
    params: &[&(dyn ToSql + Sync)],
) -> Result<Row> {
    let mut rows = query(client, sql, types, params).await?;
    match rows.len() {
        1 => Ok(rows.remove(0)),
        n => Err(Error::NotInState(format!(
            "{sql} returned {n} rows, not one"
        ))),
    }
}

fn typed<'a>(
    types: &[Type],
    params: &[&'a (dyn ToSql + Sync)],
) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    assert_eq!(types.len(), params.len(), "a type for every parameter");
    params.iter().copied().zip(types.iter().cloned()).collect()
}

/// The first column of the one row `sql` returns.
pub(crate) async fn value<C: GenericClient, T>(
    client: &C,
    sql: &str,
    types: &[Type],
    params: &[&(dyn ToSql + Sync)],
) -> Result<T>
where
    T: for<'row> tokio_postgres::types::FromSql<'row>,
{
    let row = query_one(client, sql, types, params).await?;
    Ok(row.try_get(0)?)
}

/// A duration sent as an `interval` parameter in PostgreSQL's binary form (microseconds, days,
/// months): the statement needs no `$n * interval '1 second'`, which its parse and plan paid for on
/// every call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Interval(pub Duration);

impl Interval {
    pub(crate) fn of(duration: Option<Duration>) -> Option<Interval> {
        duration.map(Interval)
    }
}

impl ToSql for Interval {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let micros = i64::try_from(self.0.as_micros())?;
        out.put_i64(micros);
        out.put_i32(0);
        out.put_i32(0);
        Ok(IsNull::No)
    }

    accepts!(INTERVAL);
    to_sql_checked!();
}
