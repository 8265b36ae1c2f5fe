//! Statements are prepared once per backend and kept: no call parses or plans SQL again. PostgreSQL's
//! plan cache re-plans a kept statement by itself when a table it uses changes.
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, PgOid};
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use pgrx::{FromDatum, IntoDatum};

/// One SQL statement with its parameter types. `writes` is false only for plain SELECTs, which then
/// run read-only (no command counter bump, and the calling statement's snapshot).
pub struct Statement {
    pub sql: &'static str,
    pub args: &'static [pg_sys::Oid],
    pub writes: bool,
}

/// Whether this transaction reads with one snapshot throughout (REPEATABLE READ or SERIALIZABLE):
/// no statement in it can see what others commit later.
pub fn snapshot_is_fixed() -> bool {
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

/// Where the row count of a statement run with `run_limited` goes.
const LIMIT_PLACEHOLDER: &str = "{limit}";

thread_local! {
    // Keyed by the statement's address (each `Statement` is a `static`) and the limit written into
    // it. Rc so that no borrow is held while a statement runs (it may call back into bussig).
    static KEPT: RefCell<HashMap<(usize, i32), Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

fn kept(
    client: &SpiClient<'_>,
    statement: &'static Statement,
    limit: i32,
) -> SpiResult<Rc<OwnedPreparedStatement>> {
    let key = (statement as *const Statement as usize, limit);
    if let Some(plan) = KEPT.with(|kept| kept.borrow().get(&key).cloned()) {
        return Ok(plan);
    }
    let args: Vec<PgOid> = statement.args.iter().map(|&oid| PgOid::from(oid)).collect();
    let sql = statement.sql.replace(LIMIT_PLACEHOLDER, &limit.to_string());
    let prepared = if statement.writes {
        client.prepare_mut(sql.as_str(), &args)?
    } else {
        client.prepare(sql.as_str(), &args)?
    };
    let plan = Rc::new(prepared.keep());
    KEPT.with(|kept| kept.borrow_mut().insert(key, plan.clone()));
    Ok(plan)
}

/// Runs a kept statement in the caller's transaction.
pub fn run<'conn>(
    client: &mut SpiClient<'conn>,
    statement: &'static Statement,
    args: &[DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'conn>> {
    run_limited(client, statement, 0, args)
}

/// Runs a statement whose SQL says `LIMIT {limit}`, with the limit written in. A LIMIT passed as a
/// parameter is unknown to the generic plan, which then looks so costly that the plan cache plans
/// the statement anew on every call; written in, each limit a backend uses keeps one good plan.
/// The caller bounds `limit` (read takes 1 to 1000).
pub fn run_limited<'conn>(
    client: &mut SpiClient<'conn>,
    statement: &'static Statement,
    limit: i32,
    args: &[DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'conn>> {
    let plan = kept(client, statement, limit)?;
    if statement.writes {
        client.update(&*plan, None, args)
    } else {
        client.select(&*plan, None, args)
    }
}

/// The first column of the first row a kept statement returns; None for no row or a NULL.
pub fn first_value<T: FromDatum + IntoDatum>(
    client: &mut SpiClient<'_>,
    statement: &'static Statement,
    args: &[DatumWithOid<'_>],
) -> SpiResult<Option<T>> {
    Ok(run(client, statement, args)?
        .next()
        .map(|row| row.get::<T>(1))
        .transpose()?
        .flatten())
}

/// The first column of every row a kept statement returns; the column is NOT NULL.
pub fn first_column<T: FromDatum + IntoDatum>(
    client: &mut SpiClient<'_>,
    statement: &'static Statement,
    args: &[DatumWithOid<'_>],
) -> SpiResult<Vec<T>> {
    run(client, statement, args)?
        .map(|row| Ok(row.get::<T>(1)?.expect("NOT NULL")))
        .collect()
}
