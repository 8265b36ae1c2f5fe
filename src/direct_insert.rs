//! Sends insert their messages the way COPY does: heap tuples, several to a WAL record, and their
//! index entries, written straight into `bussig.message`, with no INSERT statement to start and shut
//! down per call (a tenth of a send's backend time; see docs/performance.md).
//!
//! Only for the table as bussig creates it. Triggers, rules, row security, CHECK constraints,
//! generated or unknown columns, another table access method, a read-only or parallel transaction: in
//! all of these `insert` returns `None` and the caller runs its plain INSERT, which handles them.
use std::ffi::CStr;
use std::ptr;

use pgrx::datum::Interval;
use pgrx::fcinfo::{direct_function_call, direct_function_call_as_datum};
use pgrx::{pg_sys, IntoDatum, PgMemoryContexts, PgTupleDesc};

use crate::validate;

/// The columns of `bussig.message`, in order, as `sql/schema.sql` creates them.
const COLUMNS: [(&CStr, pg_sys::Oid); 15] = [
    (c"message_id", pg_sys::INT8OID),
    (c"visible_at", pg_sys::TIMESTAMPTZOID),
    (c"enqueued_at", pg_sys::TIMESTAMPTZOID),
    (c"queue_id", pg_sys::INT4OID),
    (c"priority", pg_sys::INT4OID),
    (c"delivery_count", pg_sys::INT4OID),
    (c"final_delivery", pg_sys::BOOLOID),
    (c"lock_token", pg_sys::UUIDOID),
    (c"payload", pg_sys::JSONBOID),
    (c"body_id", pg_sys::INT8OID),
    (c"headers", pg_sys::JSONBOID),
    (c"subject", pg_sys::TEXTOID),
    (c"correlation_id", pg_sys::TEXTOID),
    (c"reply_to", pg_sys::TEXTOID),
    (c"last_error", pg_sys::TEXTOID),
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

/// Rows handed to the table access method at once: as COPY does, enough to fill pages, few enough
/// that a large batch does not hold all its tuples in memory.
const ROWS_PER_FLUSH: usize = 1000;

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

/// Inserts `messages`, returning their ids in payload order, or `None` when the table or the
/// transaction needs the executor. The rows are visible to the transaction's next command.
pub fn insert(messages: &Messages) -> Option<Vec<i64>> {
    unsafe {
        if pg_sys::XactReadOnly || pg_sys::IsInParallelMode() {
            return None;
        }
        let namespace = pg_sys::get_namespace_oid(c"bussig".as_ptr(), false);
        let table = pg_sys::get_relname_relid(c"message".as_ptr(), namespace);
        let sequence = pg_sys::get_relname_relid(c"message_id_seq".as_ptr(), namespace);
        if table == pg_sys::InvalidOid || sequence == pg_sys::InvalidOid {
            return None;
        }
        // The lock an INSERT takes, held to the end of the transaction either way.
        let relation = pg_sys::table_open(table, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let ids = is_plain(relation).then(|| {
            PgMemoryContexts::new("bussig direct insert")
                .switch_to(|_| write(relation, sequence, messages))
        });
        pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        if ids.is_some() {
            pg_sys::CommandCounterIncrement();
        }
        ids
    }
}

/// Whether writing the heap and indexes directly does all that an INSERT into `relation` would.
unsafe fn is_plain(relation: pg_sys::Relation) -> bool {
    unsafe {
        let class = &*(*relation).rd_rel;
        let desc = PgTupleDesc::from_pg_unchecked((*relation).rd_att);
        let constraints = (*(*relation).rd_att).constr.as_ref();
        class.relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char
            && class.relam == pg_sys::HEAP_TABLE_AM_OID
            && !class.relrowsecurity
            && (*relation).trigdesc.is_null()
            && (*relation).rd_rules.is_null()
            && constraints.is_none_or(|c| c.num_check == 0 && !c.has_generated_stored)
            && desc.len() == COLUMNS.len()
            && COLUMNS.iter().enumerate().all(|(i, (name, type_oid))| {
                desc.get(i).is_some_and(|attribute| {
                    !attribute.attisdropped
                        && attribute.atttypid == *type_oid
                        && CStr::from_ptr(attribute.attname.data.as_ptr()) == *name
                })
            })
    }
}

unsafe fn write(
    relation: pg_sys::Relation,
    sequence: pg_sys::Oid,
    messages: &Messages,
) -> Vec<i64> {
    unsafe {
        let now = pg_sys::GetCurrentTimestamp();
        let visible_at = match messages.delay {
            Some(delay) if !validate::is_zero(&delay) => direct_function_call_as_datum(
                pg_sys::timestamptz_pl_interval,
                &[Some(pg_sys::Datum::from(now)), delay.into_datum()],
            )
            .expect("a timestamp plus an interval is a timestamp"),
            _ => pg_sys::Datum::from(now),
        };
        let mut shared: [Option<pg_sys::Datum>; COLUMNS.len()] = [None; COLUMNS.len()];
        shared[VISIBLE_AT] = Some(visible_at);
        shared[ENQUEUED_AT] = Some(pg_sys::Datum::from(
            pg_sys::GetCurrentTransactionStartTimestamp(),
        ));
        shared[QUEUE_ID] = Some(pg_sys::Datum::from(messages.queue_id));
        shared[PRIORITY] = Some(pg_sys::Datum::from(messages.priority));
        shared[DELIVERY_COUNT] = Some(pg_sys::Datum::from(0i32));
        shared[FINAL_DELIVERY] = Some(pg_sys::Datum::from(false));
        shared[HEADERS] = messages.headers;
        shared[CORRELATION_ID] = messages.correlation_id.and_then(IntoDatum::into_datum);
        shared[REPLY_TO] = messages.reply_to.and_then(IntoDatum::into_datum);

        let estate = pg_sys::CreateExecutorState();
        let result_relation = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            .cast::<pg_sys::ResultRelInfo>();
        pg_sys::InitResultRelInfo(result_relation, relation, 1, ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(result_relation, false);
        #[cfg(feature = "pg13")]
        {
            (*estate).es_result_relation_info = result_relation;
        }
        let command = pg_sys::GetCurrentCommandId(true);
        let mut slots: Vec<*mut pg_sys::TupleTableSlot> =
            (0..messages.payloads.len().min(ROWS_PER_FLUSH))
                .map(|_| pg_sys::table_slot_create(relation, ptr::null_mut()))
                .collect();
        let mut ids = Vec::with_capacity(messages.payloads.len());
        for chunk in messages.payloads.chunks(ROWS_PER_FLUSH) {
            for (slot, payload) in slots.iter().zip(chunk) {
                let id = next_id(sequence);
                ids.push(id);
                let values = std::slice::from_raw_parts_mut((**slot).tts_values, COLUMNS.len());
                let nulls = std::slice::from_raw_parts_mut((**slot).tts_isnull, COLUMNS.len());
                for (column, value) in shared.iter().enumerate() {
                    values[column] = value.unwrap_or(pg_sys::Datum::from(0));
                    nulls[column] = value.is_none();
                }
                values[MESSAGE_ID] = pg_sys::Datum::from(id);
                nulls[MESSAGE_ID] = false;
                values[PAYLOAD] = *payload;
                nulls[PAYLOAD] = false;
                pg_sys::ExecStoreVirtualTuple(*slot);
            }
            pg_sys::heap_multi_insert(
                relation,
                slots.as_mut_ptr(),
                chunk.len() as i32,
                command,
                0,
                ptr::null_mut(),
            );
            for slot in &slots[..chunk.len()] {
                insert_index_entries(result_relation, *slot, estate);
                if let Some(context) = (*estate).es_per_tuple_exprcontext.as_ref() {
                    pg_sys::MemoryContextReset(context.ecxt_per_tuple_memory);
                }
                pg_sys::ExecClearTuple(*slot);
            }
        }
        for slot in slots.drain(..) {
            pg_sys::ExecDropSingleTupleTableSlot(slot);
        }
        pg_sys::ExecCloseIndices(result_relation);
        pg_sys::FreeExecutorState(estate);
        ids
    }
}

unsafe fn next_id(sequence: pg_sys::Oid) -> i64 {
    unsafe {
        direct_function_call::<i64>(pg_sys::nextval_oid, &[Some(pg_sys::Datum::from(sequence))])
            .expect("nextval returns a value")
    }
}

unsafe fn insert_index_entries(
    result_relation: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
) {
    unsafe {
        #[cfg(feature = "pg13")]
        pg_sys::ExecInsertIndexTuples(slot, estate, false, ptr::null_mut(), ptr::null_mut());
        #[cfg(any(feature = "pg14", feature = "pg15"))]
        pg_sys::ExecInsertIndexTuples(
            result_relation,
            slot,
            estate,
            false,
            false,
            ptr::null_mut(),
            ptr::null_mut(),
        );
        #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
        pg_sys::ExecInsertIndexTuples(
            result_relation,
            slot,
            estate,
            false,
            false,
            ptr::null_mut(),
            ptr::null_mut(),
            false,
        );
        #[cfg(feature = "pg13")]
        let _ = result_relation;
    }
}
