//! Every statement runs as an unnamed prepared statement with its parameter types given
//! (`query_typed`): no named statement outlives its transaction, so the client also works through a
//! transaction-pooling proxy such as pgbouncer.
use tokio_postgres::types::{ToSql, Type};
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
