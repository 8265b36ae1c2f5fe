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
            let oldest = limits.min_by_key(|(_, kept)| kept.last_used.get()).map(|(key, _)| *key);
            kept.remove(&oldest.expect("more than none"));
        }
        let last_used = Cell::new(use_number);
        kept.insert(key, Kept { plan: plan.clone(), last_used });
    });
    Ok(plan)
}

/// How many plans this backend keeps for `statement`, over all limits.
#[cfg(any(test, feature = "pg_test"))]
pub fn kept_plans(statement: &'static Statement) -> usize {
    let address = statement as *const Statement as usize;
    KEPT.with(|kept| kept.borrow().keys().filter(|(kept, _)| *kept == address).count())
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
    if statement.writes {
        client.update(&*plan, None, args)
    } else {
        client.select(&*plan, None, args)
    }
}

/// Whether a kept statement of bussig is being planned or run.
pub fn in_kept_statement() -> bool {
    IN_KEPT_STATEMENT.with(Cell::get) > 0
}

/// While this lives, references to `bussig.message` whose alias names an index are planned with that
/// index only (see `index_pins.rs`).
struct PinsApply(());

impl PinsApply {
    fn enter() -> Self {
        IN_KEPT_STATEMENT.with(|depth| depth.set(depth.get() + 1));
        PinsApply(())
    }
}

impl Drop for PinsApply {
    fn drop(&mut self) {
        IN_KEPT_STATEMENT.with(|depth| depth.set(depth.get() - 1));
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
// result of a scan of the whole table and an ack joined against all of it, for every call through the
// next backlog until an ANALYZE happened to invalidate them again: a read of 10 took 350 ms instead of
// 5 over 200,000 messages. So the statements of bussig's SQL functions are planned as for a backlog of
// at least `ASSUMED_BACKLOG` messages, and without sequential or bitmap scans: each has an index to go
// by, in the order it needs. The worker's statements, some of which do read whole tables, are planned
// as usual.
static mut PREVIOUS_PLANNER: pg_sys::planner_hook_type = None;
static mut PREVIOUS_RELATION_INFO: pg_sys::get_relation_info_hook_type = None;
static mut PREVIOUS_RELATION_STATS: pg_sys::get_relation_stats_hook_type = None;

const ASSUMED_BACKLOG: f64 = 100_000.0;

thread_local! {
    static OWN_STATEMENTS: Cell<u32> = const { Cell::new(0) };
    static WHOLE_TABLE: Cell<bool> = const { Cell::new(false) };
}

/// Called from _PG_init.
pub fn init() {
    unsafe {
        PREVIOUS_PLANNER = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(plan);
        PREVIOUS_RELATION_INFO = pg_sys::get_relation_info_hook;
        pg_sys::get_relation_info_hook = Some(relation_info);
        PREVIOUS_RELATION_STATS = pg_sys::get_relation_stats_hook;
        pg_sys::get_relation_stats_hook = Some(relation_stats);
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

/// `enable_seqscan` and `enable_bitmapscan` off until dropped, then back to what they were, error or
/// not.
struct WholeTableScansOff {
    seqscan: bool,
    bitmapscan: bool,
}

impl WholeTableScansOff {
    fn new() -> Self {
        unsafe {
            let was = WholeTableScansOff {
                seqscan: pg_sys::enable_seqscan,
                bitmapscan: pg_sys::enable_bitmapscan,
            };
            pg_sys::enable_seqscan = false;
            pg_sys::enable_bitmapscan = false;
            was
        }
    }
}

impl Drop for WholeTableScansOff {
    fn drop(&mut self) {
        unsafe {
            pg_sys::enable_seqscan = self.seqscan;
            pg_sys::enable_bitmapscan = self.bitmapscan;
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn plan(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: std::ffi::c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    let _off = planning_own_statement().then(WholeTableScansOff::new);
    unsafe {
        match PREVIOUS_PLANNER {
            Some(previous) => pg_sys::ffi::pg_guard_ffi_boundary(|| {
                previous(parse, query_string, cursor_options, bound_params)
            }),
            None => pg_sys::standard_planner(parse, query_string, cursor_options, bound_params),
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn relation_info(
    root: *mut pg_sys::PlannerInfo,
    relation: pg_sys::Oid,
    inherited: bool,
    rel: *mut pg_sys::RelOptInfo,
) {
    unsafe {
        if let Some(previous) = PREVIOUS_RELATION_INFO {
            pg_sys::ffi::pg_guard_ffi_boundary(|| previous(root, relation, inherited, rel));
        }
        if planning_own_statement() && is_message_table(relation) {
            assume_backlog(&mut *rel);
            crate::index_pins::apply(&*root, &mut *rel);
        }
    }
}

/// Whether the statement being planned is one of bussig's: run by its SQL functions, or kept and run
/// by the worker, unless it reads whole tables on purpose (`whole_table_scans`).
fn planning_own_statement() -> bool {
    (OWN_STATEMENTS.with(Cell::get) > 0 || in_kept_statement()) && !WHOLE_TABLE.with(Cell::get)
}

/// While this lives, bussig's statements are planned as usual: for the worker's counts over every
/// message, which a sequential scan serves best.
pub struct WholeTableScans(bool);

pub fn whole_table_scans() -> WholeTableScans {
    WholeTableScans(WHOLE_TABLE.with(|whole| whole.replace(true)))
}

impl Drop for WholeTableScans {
    fn drop(&mut self) {
        WHOLE_TABLE.with(|whole| whole.set(self.0));
    }
}

// The column statistics of `bussig.message` describe a table whose rows turn over in seconds as it was
// at the last ANALYZE: a queue created since then looks like one row, and with one row every plan
// costs about the same, so the planner may leave a column it could search by to a filter and walk the
// whole queue. bussig's statements are planned with PostgreSQL's defaults instead (an equality keeps
// 0.5% of the rows, a range a third), which describe any queue well enough: each narrowing condition
// on an index column then makes the index scan cheaper, and the planner uses all of them.
#[pg_guard]
unsafe extern "C-unwind" fn relation_stats(
    root: *mut pg_sys::PlannerInfo,
    rte: *mut pg_sys::RangeTblEntry,
    attnum: pg_sys::AttrNumber,
    vardata: *mut pg_sys::VariableStatData,
) -> bool {
    // SAFETY: the planner passes valid pointers for the duration of the call. Answering true with no
    // statistics tuple (and so no free function) is what the hook's contract calls "no statistics".
    unsafe {
        if planning_own_statement() && is_message_table((*rte).relid) {
            (*vardata).statsTuple = std::ptr::null_mut();
            (*vardata).freefunc = None;
            return true;
        }
        match PREVIOUS_RELATION_STATS {
            Some(previous) => {
                pg_sys::ffi::pg_guard_ffi_boundary(|| previous(root, rte, attnum, vardata))
            }
            None => false,
        }
    }
}

fn is_message_table(relation: pg_sys::Oid) -> bool {
    bussig_relation(c"message") == relation
}

/// The oid of relation `name` in schema bussig; InvalidOid when either is missing.
pub fn bussig_relation(name: &std::ffi::CStr) -> pg_sys::Oid {
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"bussig".as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return pg_sys::InvalidOid;
        }
        pg_sys::get_relname_relid(name.as_ptr(), namespace)
    }
}

/// Scales the size estimates of the table and its full indexes up to `ASSUMED_BACKLOG` rows.
fn assume_backlog(rel: &mut pg_sys::RelOptInfo) {
    if rel.tuples >= ASSUMED_BACKLOG {
        return;
    }
    let scale = |pages: pg_sys::BlockNumber, rows: f64| -> pg_sys::BlockNumber {
        let per_row = if rel.tuples >= 1.0 && pages > 0 {
            pages as f64 / rel.tuples
        } else {
            rows
        };
        (ASSUMED_BACKLOG * per_row).ceil().max(pages as f64) as pg_sys::BlockNumber
    };
    // Without statistics: about 40 rows a heap page, 200 entries an index page.
    rel.pages = scale(rel.pages, 1.0 / 40.0);
    let indexes = unsafe { pgrx::PgList::<pg_sys::IndexOptInfo>::from_pg(rel.indexlist) };
    for index in indexes.iter_ptr() {
        let index = unsafe { &mut *index };
        // A partial index holds few of the rows whatever the backlog.
        if !index.indpred.is_null() {
            continue;
        }
        index.pages = scale(index.pages, 1.0 / 200.0);
        index.tuples = ASSUMED_BACKLOG;
    }
    rel.tuples = ASSUMED_BACKLOG;
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
