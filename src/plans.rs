//! Statements are prepared once per backend and kept: no call parses or plans SQL again. PostgreSQL's
//! plan cache re-plans a kept statement by itself when a table it uses changes.
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, PgOid};
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use pgrx::{pg_guard, FromDatum, IntoDatum};

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

// Kept plans outlive the table sizes they were made for. Planned while `bussig.message` was empty (a
// drained queue, vacuumed: the VACUUM's statistics invalidate every backend's plans), a read sorted the
// whole table and an ack scanned it, for every call through the next backlog until an ANALYZE happened
// to invalidate them again: a read of 10 took 350 ms instead of 5 over 200,000 messages. So the
// statements of bussig's SQL functions are planned without sequential scans: each has an index to go
// by. The worker's statements, some of which do read whole tables, are planned as usual.
static mut PREVIOUS_PLANNER: pg_sys::planner_hook_type = None;

thread_local! {
    static OWN_STATEMENTS: Cell<u32> = const { Cell::new(0) };
}

/// Called from _PG_init.
pub fn init() {
    unsafe {
        PREVIOUS_PLANNER = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(plan);
    }
}

/// While this lives, the statements planned are bussig's own.
pub struct OwnStatements(());

pub fn own_statements() -> OwnStatements {
    OWN_STATEMENTS.with(|depth| depth.set(depth.get() + 1));
    OwnStatements(())
}

impl Drop for OwnStatements {
    fn drop(&mut self) {
        OWN_STATEMENTS.with(|depth| depth.set(depth.get() - 1));
    }
}

/// `enable_seqscan` off until dropped, then back to what it was, error or not.
struct SequentialScansOff(bool);

impl SequentialScansOff {
    fn new() -> Self {
        let was = unsafe { pg_sys::enable_seqscan };
        unsafe { pg_sys::enable_seqscan = false };
        SequentialScansOff(was)
    }
}

impl Drop for SequentialScansOff {
    fn drop(&mut self) {
        unsafe { pg_sys::enable_seqscan = self.0 };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn plan(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: std::ffi::c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    let _off = (OWN_STATEMENTS.with(Cell::get) > 0).then(SequentialScansOff::new);
    unsafe {
        match PREVIOUS_PLANNER {
            Some(previous) => pg_sys::ffi::pg_guard_ffi_boundary(|| {
                previous(parse, query_string, cursor_options, bound_params)
            }),
            None => pg_sys::standard_planner(parse, query_string, cursor_options, bound_params),
        }
    }
}
