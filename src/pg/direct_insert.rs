//! Sends insert their messages the way COPY does: heap tuples, several to a WAL record, and their
//! index entries, written straight into `bussig.message`, with no INSERT statement to start and shut
//! down per call (a tenth of a send's backend time; see docs/performance.md).
//!
//! Only for the table as bussig creates it (dropped columns aside). Insert triggers, rules, row security,
//! CHECK constraints, generated columns, columns or NOT NULL constraints bussig does not know, another
//! table access method, partitioning, a read-only or parallel transaction: in all of these `insert`
//! returns `None` and the caller runs its plain INSERT, which handles them.
use std::cell::RefCell;
use std::ffi::CStr;
use std::ptr;

use pgrx::datum::Interval;
use pgrx::fcinfo::direct_function_call_as_datum;
use pgrx::{pg_sys, IntoDatum, PgList, PgMemoryContexts, PgTupleDesc};

use super::invalidation;

/// A column of `bussig.message` as `sql/schema.sql` creates it.
struct Column {
    name: &'static CStr,
    type_oid: pg_sys::Oid,
    not_null: bool,
}

const fn column(name: &'static CStr, type_oid: pg_sys::Oid, not_null: bool) -> Column {
    Column {
        name,
        type_oid,
        not_null,
    }
}

const COLUMNS: [Column; 18] = [
    column(c"message_id", pg_sys::INT8OID, true),
    column(c"visible_at", pg_sys::TIMESTAMPTZOID, true),
    column(c"enqueued_at", pg_sys::TIMESTAMPTZOID, true),
    column(c"queue_id", pg_sys::INT4OID, true),
    column(c"priority", pg_sys::INT4OID, true),
    column(c"delivery_count", pg_sys::INT4OID, true),
    column(c"final_delivery", pg_sys::BOOLOID, true),
    column(c"lock_token", pg_sys::UUIDOID, false),
    column(c"payload", pg_sys::JSONBOID, false),
    column(c"body_id", pg_sys::INT8OID, false),
    column(c"headers", pg_sys::JSONBOID, false),
    column(c"subject", pg_sys::TEXTOID, false),
    column(c"correlation_id", pg_sys::TEXTOID, false),
    column(c"reply_to", pg_sys::TEXTOID, false),
    column(c"last_error", pg_sys::TEXTOID, false),
    // Grouped messages are sent by statement (message::group): direct inserts leave these NULL.
    column(c"group_id", pg_sys::TEXTOID, false),
    column(c"group_seq", pg_sys::INT8OID, false),
    column(c"group_ready_at", pg_sys::TIMESTAMPTZOID, false),
];
const MESSAGE_ID: usize = 0;
const VISIBLE_AT: usize = 1;
const ENQUEUED_AT: usize = 2;
const QUEUE_ID: usize = 3;
const PRIORITY: usize = 4;
const DELIVERY_COUNT: usize = 5;
const FINAL_DELIVERY: usize = 6;
const PAYLOAD: usize = 8;
const HEADERS: usize = 10;
const CORRELATION_ID: usize = 12;
const REPLY_TO: usize = 13;

/// Where each of `COLUMNS` sits in the table's rows, which may also hold dropped columns.
#[derive(Clone, Copy)]
struct Layout {
    positions: [usize; COLUMNS.len()],
    width: usize,
}

/// Rows handed to the table access method at once: as COPY does, enough to fill pages, few enough
/// that a large batch does not hold all its tuples in memory.
pub(super) const ROWS_PER_FLUSH: usize = 1000;

/// Messages for one queue, sharing everything but their payloads.
pub struct Messages<'a> {
    pub queue_id: i32,
    /// `jsonb` datums.
    pub payloads: &'a [pg_sys::Datum],
    pub headers: Option<pg_sys::Datum>,
    pub delay: Option<Interval>,
    pub priority: i32,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
}

/// What sends keep of `bussig.message` from one call to the next, so that a send opens the table and
/// its indexes and no more: looking the relations up, checking the layout, building each index's
/// description and compiling the partial indexes' predicates cost a single send 4% of its backend
/// time. Rebuilt when a relcache invalidation touches the table, an index or the id sequence (see
/// `invalidation::watch_message_table`).
struct Target {
    table: pg_sys::Oid,
    sequence: pg_sys::Oid,
    /// None when the table needs the INSERT statement.
    direct: Option<Direct>,
    /// Holds everything `direct` points to; declared last, so dropped last.
    _memory: PgMemoryContexts,
}

/// The parts of an insert that outlive a call, all allocated in the target's memory context.
pub(super) struct Direct {
    /// The target's memory context.
    memory: pg_sys::MemoryContext,
    layout: Layout,
    indexes: Vec<pg_sys::Oid>,
    index_infos: Vec<*mut pg_sys::IndexInfo>,
    /// Filled with the opened indexes on each call.
    index_relations: Vec<pg_sys::Relation>,
    result_relation: *mut pg_sys::ResultRelInfo,
    /// Holds the compiled predicates and index expressions, and the per-row memory the index
    /// insertions run in.
    estate: *mut pg_sys::EState,
    per_row: pg_sys::MemoryContext,
    /// Slots over a copy of the row type, which is not reference-counted: pinning the relation's
    /// own for every slot cost more than filling it. Made as large batches need them.
    row_type: pg_sys::TupleDesc,
    pub(super) slots: Vec<*mut pg_sys::TupleTableSlot>,
    /// heap_multi_insert leaves its tuple copies (toasted ones among them) in the current context.
    flush: PgMemoryContexts,
}

thread_local! {
    static TARGET: RefCell<Option<Target>> = const { RefCell::new(None) };
}

/// Inserts `messages`, returning their ids in payload order, or `None` when the table or the
/// transaction needs the executor. The rows are visible to the transaction's next command.
pub fn insert(messages: &Messages) -> Option<Vec<i64>> {
    // SAFETY: `write` gets the relation and a target built for this very table.
    unsafe { with_direct(|relation, direct, sequence| write(relation, direct, sequence, messages)) }
}

/// Whether `bussig.message` takes rows written straight into it now.
pub fn writable() -> bool {
    // SAFETY: the work is empty; with_direct only opens the table and builds its target.
    unsafe { with_direct(|_, _, _| ()).is_some() }
}

/// Runs `write` on `bussig.message`, opened with an INSERT's lock (kept to the end of the
/// transaction), with the target kept for it and its id sequence; None when the table or the
/// transaction needs the executor.
pub(super) unsafe fn with_direct<T>(
    write: impl FnOnce(pg_sys::Relation, &mut Direct, pg_sys::Oid) -> T,
) -> Option<T> {
    // SAFETY: inside a transaction (a SQL function's call); the relation is opened with an INSERT's
    // lock and closed with NoLock, keeping the lock to the end of the transaction; `write` gets the
    // relation and a target built for this very table, checked current after the lock applied
    // pending invalidations.
    unsafe {
        if pg_sys::XactReadOnly || pg_sys::IsInParallelMode() {
            return None;
        }
        // Owned while in use: an error unwinding through here drops it with all it allocated.
        let mut target = TARGET.with(|kept| kept.borrow_mut().take());
        // The lock an INSERT takes, held to the end of the transaction either way. Taking it applies
        // pending invalidations, so a kept target is checked after it.
        let relation = loop {
            match &target {
                Some(kept) => {
                    let relation = pg_sys::try_relation_open(kept.table, ROW_EXCLUSIVE);
                    if !relation.is_null() && invalidation::message_table_is_current() {
                        break relation;
                    }
                    if !relation.is_null() {
                        pg_sys::relation_close(relation, ROW_EXCLUSIVE);
                    }
                    target = None;
                }
                None => {
                    let table = crate::pg::catalog::bussig_relation(c"message");
                    let sequence = crate::pg::catalog::bussig_relation(c"message_id_seq");
                    if table == pg_sys::InvalidOid || sequence == pg_sys::InvalidOid {
                        return None;
                    }
                    invalidation::watch_message_table(&[table, sequence]);
                    let relation = pg_sys::table_open(table, ROW_EXCLUSIVE);
                    target = Some(Target::build(table, sequence, relation));
                    break relation;
                }
            }
        };
        let mut target = target.expect("a target was found or built");
        let sequence = target.sequence;
        let written = target
            .direct
            .as_mut()
            .map(|direct| write(relation, direct, sequence));
        pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        TARGET.with(|kept| *kept.borrow_mut() = Some(target));
        if written.is_some() {
            pg_sys::CommandCounterIncrement();
        }
        written
    }
}

const ROW_EXCLUSIVE: pg_sys::LOCKMODE = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;

impl Target {
    unsafe fn build(
        table: pg_sys::Oid,
        sequence: pg_sys::Oid,
        relation: pg_sys::Relation,
    ) -> Target {
        // SAFETY: `relation` is open; the memory context is a child of CacheMemoryContext, owned by
        // the Target and deleted with it.
        unsafe {
            let mut memory = PgMemoryContexts::CacheMemoryContext
                .switch_to(|_| PgMemoryContexts::new("bussig message table"));
            let direct = layout(relation)
                .and_then(|layout| memory.switch_to(|_| Direct::build(relation, layout)));
            Target {
                table,
                sequence,
                direct,
                _memory: memory,
            }
        }
    }
}

impl Direct {
    /// Runs in the target's memory context. None when an index is not a B-tree without exclusion
    /// constraint: other access methods keep state of their own between insertions, for one
    /// statement only.
    unsafe fn build(relation: pg_sys::Relation, layout: Layout) -> Option<Direct> {
        // SAFETY: `relation` is open and `layout` was read from it; everything built lives in the
        // current memory context, the target's own.
        unsafe {
            let estate = pg_sys::CreateExecutorState();
            let indexes: Vec<pg_sys::Oid> =
                PgList::<pg_sys::Oid>::from_pg(pg_sys::RelationGetIndexList(relation))
                    .iter_oid()
                    .collect();
            let mut index_infos = Vec::with_capacity(indexes.len());
            for &index in &indexes {
                invalidation::also_watch_message_table(index);
                let index_relation = pg_sys::index_open(index, ROW_EXCLUSIVE);
                let info = pg_sys::BuildIndexInfo(index_relation);
                pg_sys::index_close(index_relation, pg_sys::NoLock as pg_sys::LOCKMODE);
                if (*info).ii_Am != pg_sys::BTREE_AM_OID || !(*info).ii_ExclusionOps.is_null() {
                    return None;
                }
                // What ExecInsertIndexTuples would otherwise compile for each statement.
                if !(*info).ii_Predicate.is_null() {
                    (*info).ii_PredicateState =
                        pg_sys::ExecPrepareQual((*info).ii_Predicate, estate);
                }
                if !(*info).ii_Expressions.is_null() {
                    (*info).ii_ExpressionsState =
                        pg_sys::ExecPrepareExprList((*info).ii_Expressions, estate);
                }
                index_infos.push(info);
            }
            let per_row = (*pg_sys::MakePerTupleExprContext(estate)).ecxt_per_tuple_memory;
            Some(Direct {
                memory: pg_sys::CurrentMemoryContext,
                layout,
                index_relations: vec![ptr::null_mut(); indexes.len()],
                indexes,
                index_infos,
                result_relation: pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
                    .cast(),
                estate,
                per_row,
                row_type: pg_sys::CreateTupleDescCopy((*relation).rd_att),
                slots: Vec::new(),
                flush: PgMemoryContexts::new("bussig direct insert flush"),
            })
        }
    }
}

/// The table's layout when writing its heap and indexes directly does all that an INSERT would.
unsafe fn layout(relation: pg_sys::Relation) -> Option<Layout> {
    // SAFETY: `relation` is open, so its relcache entry, tuple descriptor and trigger data are
    // valid for this call.
    unsafe {
        let class = &*(*relation).rd_rel;
        let constraints = (*(*relation).rd_att).constr.as_ref();
        let plain = class.relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char
            && class.relam == pg_sys::HEAP_TABLE_AM_OID
            && !class.relispartition
            && !class.relrowsecurity
            && (*relation).trigdesc.as_ref().is_none_or(|t| {
                // bussig's own TRUNCATE trigger is no concern of an insert; any other trigger is.
                !(t.trig_insert_before_row
                    || t.trig_insert_after_row
                    || t.trig_insert_instead_row
                    || t.trig_insert_before_statement
                    || t.trig_insert_after_statement
                    || t.trig_insert_new_table)
            })
            && (*relation).rd_rules.is_null()
            && constraints.is_none_or(|c| c.num_check == 0 && !c.has_generated_stored);
        if !plain {
            return None;
        }
        let desc = PgTupleDesc::from_pg_unchecked((*relation).rd_att);
        let mut positions = [None; COLUMNS.len()];
        for (position, attribute) in desc.iter().enumerate() {
            if attribute.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(attribute.attname.data.as_ptr());
            let known = COLUMNS.iter().position(|column| column.name == name)?;
            let column = &COLUMNS[known];
            if attribute.atttypid != column.type_oid
                || attribute.attnotnull != column.not_null
                || positions[known].replace(position).is_some()
            {
                return None;
            }
        }
        if positions.contains(&None) {
            return None;
        }
        Some(Layout {
            positions: positions.map(Option::unwrap),
            width: desc.len(),
        })
    }
}

unsafe fn write(
    relation: pg_sys::Relation,
    direct: &mut Direct,
    sequence: pg_sys::Oid,
    messages: &Messages,
) -> Vec<i64> {
    // SAFETY: `relation` is open with an INSERT's lock and `direct` was built for it; each tuple is
    // formed from datums that live through the call, written with the current command id, and its
    // index entries inserted before the next.
    unsafe {
        let result_relation = open_indexes(relation, direct, messages.payloads.len());
        let layout = direct.layout;
        let now = pg_sys::Datum::from(pg_sys::GetCurrentTimestamp());
        let visible_at = match messages.delay {
            Some(delay) => direct_function_call_as_datum(
                pg_sys::timestamptz_pl_interval,
                &[Some(now), delay.into_datum()],
            )
            .expect("a timestamp plus an interval is a timestamp"),
            None => now,
        };
        let at = |column: usize| layout.positions[column];
        let mut row: Vec<Option<pg_sys::Datum>> = vec![None; layout.width];
        row[at(VISIBLE_AT)] = Some(visible_at);
        row[at(ENQUEUED_AT)] = Some(pg_sys::Datum::from(
            pg_sys::GetCurrentTransactionStartTimestamp(),
        ));
        row[at(QUEUE_ID)] = Some(pg_sys::Datum::from(messages.queue_id));
        row[at(PRIORITY)] = Some(pg_sys::Datum::from(messages.priority));
        row[at(DELIVERY_COUNT)] = Some(pg_sys::Datum::from(0i32));
        row[at(FINAL_DELIVERY)] = Some(pg_sys::Datum::from(false));
        row[at(HEADERS)] = messages.headers;
        row[at(CORRELATION_ID)] = messages.correlation_id.and_then(IntoDatum::into_datum);
        row[at(REPLY_TO)] = messages.reply_to.and_then(IntoDatum::into_datum);

        let command = pg_sys::GetCurrentCommandId(true);
        let ids = next_ids(sequence, messages.payloads.len());
        for (chunk, chunk_ids) in messages
            .payloads
            .chunks(ROWS_PER_FLUSH)
            .zip(ids.chunks(ROWS_PER_FLUSH))
        {
            for ((slot, payload), &id) in direct.slots.iter().zip(chunk).zip(chunk_ids) {
                let values = std::slice::from_raw_parts_mut((**slot).tts_values, layout.width);
                let nulls = std::slice::from_raw_parts_mut((**slot).tts_isnull, layout.width);
                for (position, value) in row.iter().enumerate() {
                    values[position] = value.unwrap_or(pg_sys::Datum::from(0));
                    nulls[position] = value.is_none();
                }
                values[at(MESSAGE_ID)] = pg_sys::Datum::from(id);
                nulls[at(MESSAGE_ID)] = false;
                values[at(PAYLOAD)] = *payload;
                nulls[at(PAYLOAD)] = false;
                pg_sys::ExecStoreVirtualTuple(*slot);
            }
            // Materializing the heap tuple marks the slot's values as unread, though they are the ones
            // just stored and their datums outlive the call: reading them back from the tuple was a
            // tenth of the index insertions' time.
            let stored_values = Some(layout.width as pg_sys::AttrNumber);
            let chunk_rows = (chunk.len(), command, 0);
            flush(relation, direct, result_relation, chunk_rows, stored_values);
        }
        close_indexes(direct);
        ids
    }
}

/// What ExecOpenIndices does, with the index descriptions kept from the last call, and slots for
/// `rows` rows (up to a flush's): the result relation to insert index entries through.
pub(super) unsafe fn open_indexes(
    relation: pg_sys::Relation,
    direct: &mut Direct,
    rows: usize,
) -> *mut pg_sys::ResultRelInfo {
    // SAFETY: `relation` is open with an INSERT's lock and `direct` was built for it; the indexes
    // are opened with the same lock, and closed by `close_indexes`.
    unsafe {
        for (opened, &index) in direct.index_relations.iter_mut().zip(&direct.indexes) {
            *opened = pg_sys::index_open(index, ROW_EXCLUSIVE);
        }
        let result_relation = direct.result_relation;
        pg_sys::InitResultRelInfo(result_relation, relation, 1, ptr::null_mut(), 0);
        (*result_relation).ri_NumIndices = direct.indexes.len() as i32;
        (*result_relation).ri_IndexRelationDescs = direct.index_relations.as_mut_ptr();
        (*result_relation).ri_IndexRelationInfo = direct.index_infos.as_mut_ptr();
        #[cfg(feature = "pg13")]
        {
            (*direct.estate).es_result_relation_info = result_relation;
        }
        let wanted = rows.min(ROWS_PER_FLUSH);
        while direct.slots.len() < wanted {
            let slot = PgMemoryContexts::For(direct.memory).switch_to(|_| {
                pg_sys::MakeSingleTupleTableSlot(direct.row_type, &pg_sys::TTSOpsHeapTuple)
            });
            direct.slots.push(slot);
        }
        result_relation
    }
}

pub(super) unsafe fn close_indexes(direct: &mut Direct) {
    // SAFETY: the indexes `open_indexes` opened; their locks stay to the end of the transaction, as
    // the table's does.
    unsafe {
        for opened in &mut direct.index_relations {
            pg_sys::index_close(*opened, pg_sys::NoLock as pg_sys::LOCKMODE);
            *opened = ptr::null_mut();
        }
    }
}

/// Writes the first `count` slots' rows with heap_multi_insert `options` and command `command`, then
/// their index entries, and clears the slots. `stored_values`: how many of each slot's values are
/// still valid after the write materialized its tuple (None: read them back from the tuple).
pub(super) unsafe fn flush(
    relation: pg_sys::Relation,
    direct: &mut Direct,
    result_relation: *mut pg_sys::ResultRelInfo,
    (count, command, options): (usize, pg_sys::CommandId, i32),
    stored_values: Option<pg_sys::AttrNumber>,
) {
    // SAFETY: `relation` is open with an INSERT's lock, `direct` was built for it and its indexes
    // opened (`open_indexes`); the first `count` slots hold rows formed for it.
    unsafe {
        direct.flush.switch_to(|_| {
            pg_sys::heap_multi_insert(
                relation,
                direct.slots.as_mut_ptr(),
                count as i32,
                command,
                options,
                ptr::null_mut(),
            )
        });
        for slot in &direct.slots[..count] {
            if let Some(valid) = stored_values {
                (**slot).tts_nvalid = valid;
            }
            PgMemoryContexts::For(direct.per_row)
                .switch_to(|_| insert_index_entries(result_relation, *slot, direct.estate));
            pg_sys::ExecClearTuple(*slot);
        }
        // Index insertions free their tuples; what predicates or expressions leave is bounded by the
        // chunk.
        pg_sys::MemoryContextReset(direct.per_row);
        direct.flush.reset();
    }
}

unsafe extern "C-unwind" {
    /// commands/sequence.h, the same from PostgreSQL 10 on; not in pgrx's bindings.
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// Without the privilege check, as an identity column's next value is taken: sends run as the owner
/// of the sequence. nextval() through the function manager, as the hand-written INSERT takes its ids,
/// costs a sixth more instructions (callgrind, docs/performance.md).
unsafe fn next_id(sequence: pg_sys::Oid) -> i64 {
    // SAFETY: the sequence exists (looked up with the table); an ERROR from nextval crosses back
    // through pg_guard_ffi_boundary.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(sequence, false)) }
}

/// `count` new ids, increasing. The sequence steps by more than one (sql/schema.sql), and a value
/// stands for every id since the one before it: a batch of a hundred takes one value instead of a
/// hundred, which was a tenth of its instructions, and its ids still follow each other in send order.
unsafe fn next_ids(sequence: pg_sys::Oid, count: usize) -> Vec<i64> {
    // SAFETY: as in next_id; the step and minimum are read after the first nextval locked the
    // sequence.
    unsafe {
        let mut ids = Vec::with_capacity(count);
        let mut step_and_min = None;
        while ids.len() < count {
            let value = next_id(sequence);
            let first = if count > 1 {
                // Read after the first nextval, whose lock keeps ALTER SEQUENCE out until the
                // transaction ends: the step is the one every value of the batch was taken with.
                let (step, min) = *step_and_min.get_or_insert_with(|| sequence_step(sequence));
                value.saturating_sub(step - 1).max(min)
            } else {
                value
            };
            let wanted = (count - ids.len()) as i64;
            ids.extend(first..=value.min(first.saturating_add(wanted - 1)));
        }
        ids
    }
}

/// pg_sequence's row, catalog/pg_sequence.h, the same from PostgreSQL 10 on; not in pgrx's bindings.
#[repr(C)]
#[allow(dead_code)] // each field places the next
struct SequenceForm {
    seqrelid: pg_sys::Oid,
    seqtypid: pg_sys::Oid,
    seqstart: i64,
    seqincrement: i64,
    seqmax: i64,
    seqmin: i64,
    seqcache: i64,
    seqcycle: bool,
}

/// The sequence's increment when it counts upwards (else 1), and its minimum.
unsafe fn sequence_step(sequence: pg_sys::Oid) -> (i64, i64) {
    // SAFETY: a syscache look-up inside a transaction; the tuple is checked for NULL and released
    // after its fields are copied.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::SEQRELID as i32,
            pg_sys::Datum::from(sequence),
        );
        if tuple.is_null() {
            return (1, i64::MIN);
        }
        let form = &*pg_sys::heap_tuple_get_struct::<SequenceForm>(tuple);
        let found = (form.seqincrement.max(1), form.seqmin);
        pg_sys::ReleaseSysCache(tuple);
        found
    }
}

unsafe fn insert_index_entries(
    result_relation: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
) {
    // SAFETY: the slot holds the tuple just inserted into the result relation, and the executor
    // state is the one its indexes were opened in.
    unsafe {
        #[cfg(feature = "pg13")]
        pg_sys::ExecInsertIndexTuples(slot, estate, false, ptr::null_mut(), ptr::null_mut());
        // pg16 added `onlySummarizing` (false: every index) after the arguments pg14 and pg15 take.
        #[cfg(not(feature = "pg13"))]
        macro_rules! insert_into_every_index {
            ($($only_summarizing:expr)?) => {
                pg_sys::ExecInsertIndexTuples(
                    result_relation,
                    slot,
                    estate,
                    false,
                    false,
                    ptr::null_mut(),
                    ptr::null_mut(),
                    $($only_summarizing)?
                )
            };
        }
        #[cfg(any(feature = "pg14", feature = "pg15"))]
        insert_into_every_index!();
        #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
        insert_into_every_index!(false);
        #[cfg(feature = "pg13")]
        let _ = result_relation;
    }
}
