//! The planner hooks bussig installs: its own statements are planned for a backlog, without table
//! statistics, and through the indexes their aliases name (`index_pins`).
use std::cell::Cell;

use pgrx::{pg_guard, pg_sys};

use super::index_pins;
use crate::plans::in_kept_statement;

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

/// Called from _PG_init, once per process.
pub(super) fn init() {
    // SAFETY: called from _PG_init, once per process and single-threaded; the hooks take effect from
    // the next planning, and the previous hooks are kept and called.
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
        // SAFETY: backend-local planner settings, restored by Drop, which also runs while an error
        // unwinds.
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
        // SAFETY: restores the values `new` saved.
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
    // SAFETY: the planner's own arguments are passed on unchanged; an ERROR in the previous hook
    // crosses back through pg_guard_ffi_boundary.
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
    // SAFETY: the planner passes valid pointers for the duration of the call, and `rel` is the
    // relation being planned.
    unsafe {
        if let Some(previous) = PREVIOUS_RELATION_INFO {
            pg_sys::ffi::pg_guard_ffi_boundary(|| previous(root, relation, inherited, rel));
        }
        if planning_own_statement() && is_message_table(relation) {
            assume_backlog(&mut *rel);
            index_pins::apply(&*root, &mut *rel);
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
    super::catalog::bussig_relation(c"message") == relation
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
    // SAFETY: rel.indexlist is a List of IndexOptInfo pointers the planner built for this relation.
    let indexes = unsafe { pgrx::PgList::<pg_sys::IndexOptInfo>::from_pg(rel.indexlist) };
    for index in indexes.iter_ptr() {
        // SAFETY: each element is a valid IndexOptInfo, and only this hook touches it now.
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
