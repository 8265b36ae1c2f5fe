//! Statements are prepared once per backend and kept: no call parses or plans SQL again. PostgreSQL's
//! plan cache re-plans a kept statement by itself when a table it uses changes.
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, PgOid};
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};

/// One SQL statement with its parameter types. `writes` is false only for plain SELECTs, which then
/// run read-only (no command counter bump).
pub struct Statement {
    pub sql: &'static str,
    pub args: &'static [pg_sys::Oid],
    pub writes: bool,
}

thread_local! {
    // Keyed by the statement's address: each `Statement` is a `static`. Rc so that no borrow is held
    // while a statement runs (it may call back into bussig).
    static KEPT: RefCell<HashMap<usize, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

fn kept(
    client: &SpiClient<'_>,
    statement: &'static Statement,
) -> SpiResult<Rc<OwnedPreparedStatement>> {
    let key = statement as *const Statement as usize;
    if let Some(plan) = KEPT.with(|kept| kept.borrow().get(&key).cloned()) {
        return Ok(plan);
    }
    let args: Vec<PgOid> = statement.args.iter().map(|&oid| PgOid::from(oid)).collect();
    let prepared = if statement.writes {
        client.prepare_mut(statement.sql, &args)?
    } else {
        client.prepare(statement.sql, &args)?
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
    let plan = kept(client, statement)?;
    if statement.writes {
        client.update(&*plan, None, args)
    } else {
        client.select(&*plan, None, args)
    }
}
