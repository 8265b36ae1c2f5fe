//! Statements are prepared once per backend and kept: no call parses or plans SQL again. PostgreSQL's
//! plan cache re-plans a kept statement by itself when a table it uses changes.
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, PgOid};
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiHeapTupleData, SpiResult, SpiTupleTable};
use pgrx::{FromDatum, IntoDatum};

use crate::error::{BusError, BusResult};

/// One SQL statement with its parameter types. `writes` is false only for plain SELECTs, which then
/// run read-only (no command counter bump, and the calling statement's snapshot).
pub struct Statement {
    pub sql: &'static str,
    pub args: &'static [pg_sys::Oid],
    pub writes: bool,
}

/// Where the row count of a statement run with `run_limited` goes.
const LIMIT_PLACEHOLDER: &str = "{limit}";

/// Limits of one statement a backend keeps a plan for; the least recently used goes first. A read's
/// limit can be anything from 1 to 1,000, and 1,000 plans a statement would be megabytes a backend.
const LIMITS_KEPT: usize = 16;

thread_local! {
    // How deep this backend is in planning or running a kept statement: index pins apply then.
    static IN_KEPT_STATEMENT: Cell<u32> = const { Cell::new(0) };
    // Keyed by the statement's address (each `Statement` is a `static`) and the limit written into
    // it. Rc so that no borrow is held while a statement runs (it may call back into bussig).
    static KEPT: RefCell<HashMap<(usize, i32), Kept>> = RefCell::new(HashMap::new());
    static USES: Cell<u64> = const { Cell::new(0) };
}

struct Kept {
    plan: Rc<OwnedPreparedStatement>,
    last_used: Cell<u64>,
}

fn kept(
    client: &SpiClient<'_>,
    statement: &'static Statement,
    limit: i32,
) -> SpiResult<Rc<OwnedPreparedStatement>> {
    let key = (statement as *const Statement as usize, limit);
    let use_number = USES.with(|uses| {
        uses.set(uses.get() + 1);
        uses.get()
    });
    let found = KEPT.with(|kept| {
        let kept = kept.borrow();
        let found = kept.get(&key)?;
        found.last_used.set(use_number);
        Some(found.plan.clone())
    });
    if let Some(plan) = found {
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
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        let limits = kept.iter().filter(|((address, _), _)| *address == key.0);
        if limits.clone().count() >= LIMITS_KEPT {
            let oldest = limits
                .min_by_key(|(_, kept)| kept.last_used.get())
                .map(|(key, _)| *key);
            kept.remove(&oldest.expect("more than none"));
        }
        let last_used = Cell::new(use_number);
        kept.insert(
            key,
            Kept {
                plan: plan.clone(),
                last_used,
            },
        );
    });
    Ok(plan)
}

/// How many plans this backend keeps for `statement`, over all limits.
#[cfg(any(test, feature = "pg_test"))]
pub fn kept_plans(statement: &'static Statement) -> usize {
    let address = statement as *const Statement as usize;
    KEPT.with(|kept| {
        kept.borrow()
            .keys()
            .filter(|(kept, _)| *kept == address)
            .count()
    })
}

/// `first` followed by `then`: the parameter types of a statement that takes another's and more.
pub const fn joined<const FIRST: usize, const THEN: usize, const ALL: usize>(
    first: [pg_sys::Oid; FIRST],
    then: [pg_sys::Oid; THEN],
) -> [pg_sys::Oid; ALL] {
    assert!(FIRST + THEN == ALL, "ALL must be FIRST + THEN");
    let mut all = [pg_sys::InvalidOid; ALL];
    let mut i = 0;
    while i < ALL {
        all[i] = if i < FIRST { first[i] } else { then[i - FIRST] };
        i += 1;
    }
    all
}

/// Column `column` (from 1) of a row whose statement never leaves it NULL; `what` names it in the
/// error that a NULL there means broken rows (XX001), not a panic.
pub fn filled<T: FromDatum + IntoDatum>(
    row: &SpiHeapTupleData<'_>,
    column: usize,
    what: &str,
) -> BusResult<T> {
    row.get::<T>(column)?.ok_or_else(|| {
        BusError::Corrupt(format!(
            "bussig found no {what} where its rows always hold one"
        ))
    })
}

/// Prepares a statement now, so that its first run does not plan it.
pub fn prepare(client: &SpiClient<'_>, statement: &'static Statement) -> SpiResult<()> {
    let _pins = PinsApply::enter();
    kept(client, statement, 0).map(drop)
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
    let _pins = PinsApply::enter();
    let plan = kept(client, statement, limit)?;
    // The plan cache may plan the statement anew here (after an invalidation).
    execute(client, &plan, statement.writes, None, args)
}

/// Runs a kept plan: a writing statement through `update` (a new snapshot and a command counter bump
/// for each), else through `select`; `rows` stops it early.
fn execute<'conn>(
    client: &mut SpiClient<'conn>,
    plan: &OwnedPreparedStatement,
    writes: bool,
    rows: Option<i64>,
    args: &[DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'conn>> {
    if writes {
        client.update(plan, rows, args)
    } else {
        client.select(plan, rows, args)
    }
}

/// Statements whose text is made at run time (a stream's own table is named in it) that a backend
/// keeps; past that it starts over.
const TEXTS_KEPT: usize = 512;

thread_local! {
    static KEPT_TEXTS: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Runs a statement made at run time, kept by its text as `run` keeps a `Statement`.
pub fn run_text<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &str,
    types: &[pg_sys::Oid],
    writes: bool,
    args: &[DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'conn>> {
    run_text_stopping(client, sql, types, writes, args, None)
}

/// `run_text` that stops after `rows` rows when given: a statement keeps one plan for the LIMIT written
/// in its text, and each call takes as many rows as it needs.
pub fn run_text_stopping<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &str,
    types: &[pg_sys::Oid],
    writes: bool,
    args: &[DatumWithOid<'_>],
    rows: Option<i64>,
) -> SpiResult<SpiTupleTable<'conn>> {
    let _pins = PinsApply::enter();
    let found = KEPT_TEXTS.with(|kept| kept.borrow().get(sql).cloned());
    let plan = match found {
        Some(plan) => plan,
        None => {
            let oids: Vec<PgOid> = types.iter().map(|&oid| PgOid::from(oid)).collect();
            let prepared = if writes {
                client.prepare_mut(sql, &oids)?
            } else {
                client.prepare(sql, &oids)?
            };
            let plan = Rc::new(prepared.keep());
            KEPT_TEXTS.with(|kept| {
                let mut kept = kept.borrow_mut();
                if kept.len() >= TEXTS_KEPT {
                    kept.clear();
                }
                kept.insert(sql.to_string(), plan.clone());
            });
            plan
        }
    };
    execute(client, &plan, writes, rows, args)
}

/// Whether a kept statement of bussig is being planned or run.
pub fn in_kept_statement() -> bool {
    IN_KEPT_STATEMENT.with(Cell::get) > 0
}

/// While this lives, references to `bussig.message` whose alias names an index are planned with that
/// index only (see `pg/index_pins.rs`), and kept statements run their generic plan. Their access
/// paths do not depend on the values (the pins fix them; limits are written in), so a custom plan
/// buys nothing; but where the plan cache finds a custom plan cheaper than the generic one, it plans
/// the statement anew on every call: a fifth of the server's CPU with 32 long-polling consumers.
/// The setting is the planner's variable itself, restored on drop (also when an error unwinds):
/// going through the GUC machinery on every call would cost more than the plans it saves.
struct PinsApply {
    plan_cache_mode: Option<std::ffi::c_int>,
}

impl PinsApply {
    fn enter() -> Self {
        let outermost = IN_KEPT_STATEMENT.with(|depth| {
            depth.set(depth.get() + 1);
            depth.get() == 1
        });
        // SAFETY: a backend-local planner setting, read and written by this thread only; restored by
        // `drop`.
        let plan_cache_mode = outermost.then(|| unsafe {
            let before = pg_sys::plan_cache_mode;
            pg_sys::plan_cache_mode =
                pg_sys::PlanCacheMode::PLAN_CACHE_MODE_FORCE_GENERIC_PLAN as _;
            before
        });
        PinsApply { plan_cache_mode }
    }
}

impl Drop for PinsApply {
    fn drop(&mut self) {
        IN_KEPT_STATEMENT.with(|depth| depth.set(depth.get() - 1));
        if let Some(before) = self.plan_cache_mode {
            // SAFETY: as in `enter`.
            unsafe { pg_sys::plan_cache_mode = before };
        }
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

/// The first column of every row a kept statement returns; the column is never NULL.
pub fn first_column<T: FromDatum + IntoDatum>(
    client: &mut SpiClient<'_>,
    statement: &'static Statement,
    args: &[DatumWithOid<'_>],
) -> BusResult<Vec<T>> {
    run(client, statement, args)?
        .map(|row| filled(&row, 1, "value"))
        .collect()
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use super::{kept_plans, run_limited, Statement, LIMITS_KEPT};

    static SERIES: Statement = Statement {
        sql: "SELECT g FROM generate_series(1, 1000) g LIMIT {limit}",
        args: &[],
        writes: false,
    };

    #[pg_test]
    fn a_statement_keeps_plans_for_its_recent_limits_only() {
        Spi::connect_mut(|client| {
            for limit in (1..=40).chain(1..=3) {
                let rows = run_limited(client, &SERIES, limit, &[]).unwrap();
                assert_eq!(rows.len(), limit as usize, "rows of LIMIT {limit}");
            }
        });
        assert_eq!(kept_plans(&SERIES), LIMITS_KEPT);
    }
}
