//! Reading a row version's header straight from its heap page, for `bussig.superseded`.
use pgrx::itemptr::item_pointer_get_both;
use pgrx::pg_sys;

/// Whether row `version` of table `relation` is taken by another transaction: updated or deleted by one
/// that committed, or updated, deleted or row-locked by one still in progress. False whenever the row
/// does not plainly say so. A block past the end of the table is an error.
pub fn taken_by_another(relation: pg_sys::Oid, version: pg_sys::ItemPointerData) -> bool {
    let (block, offset) = item_pointer_get_both(version);
    // SAFETY: relation_open raises an ERROR for an unknown oid, and only a heap's pages are read (the
    // access method is checked); ReadBufferExtended raises an ERROR for a block past the end; the
    // buffer is pinned and share-locked while its page is read, and released before the relation is
    // closed; the item is read only when the page says it is a normal tuple.
    unsafe {
        let relation = pg_sys::relation_open(relation, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let is_heap = (*(*relation).rd_rel).relam == pg_sys::HEAP_TABLE_AM_OID;
        let answer = is_heap && {
            let buffer = pg_sys::ReadBufferExtended(
                relation,
                pg_sys::ForkNumber::MAIN_FORKNUM,
                block,
                pg_sys::ReadBufferMode::RBM_NORMAL,
                std::ptr::null_mut(),
            );
            pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_SHARE as i32);
            let page = pg_sys::BufferGetPage(buffer);
            let header = (offset >= 1 && offset <= pg_sys::PageGetMaxOffsetNumber(page))
                .then(|| pg_sys::PageGetItemId(page, offset))
                .filter(|&item| (*item).lp_flags() == pg_sys::LP_NORMAL)
                .map(|item| {
                    let tuple =
                        pg_sys::PageGetItem(page, item).cast::<pg_sys::HeapTupleHeaderData>();
                    ((*tuple).t_infomask as u32, (*tuple).t_choice.t_heap.t_xmax)
                });
            pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_UNLOCK as i32);
            pg_sys::ReleaseBuffer(buffer);
            header.is_some_and(|(infomask, xmax)| taken(infomask, xmax))
        };
        pg_sys::relation_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        answer
    }
}

/// From a row version's infomask and xmax: replaced by an update or delete that committed, or held by
/// another transaction in progress (its update, delete or row lock), which `FOR UPDATE SKIP LOCKED` would
/// skip as well, after a heavier look (the row lock's attempt and a lock-table probe). Multixacts, and
/// what this transaction did itself, say nothing of the kind.
fn taken(infomask: u32, xmax: pg_sys::TransactionId) -> bool {
    if infomask & pg_sys::HEAP_XMAX_INVALID != 0 || infomask & pg_sys::HEAP_XMAX_IS_MULTI != 0 {
        return false;
    }
    let locked_only = infomask & pg_sys::HEAP_XMAX_LOCK_ONLY != 0
        || infomask & pg_sys::HEAP_LOCK_MASK == pg_sys::HEAP_XMAX_EXCL_LOCK;
    if !locked_only && infomask & pg_sys::HEAP_XMAX_COMMITTED != 0 {
        return true;
    }
    // In this order: a transaction shows as committed in the commit log before it leaves the proc array.
    // SAFETY: plain look-ups of transaction status by id, which PostgreSQL allows any backend at
    // any time.
    unsafe {
        if pg_sys::TransactionIdIsCurrentTransactionId(xmax) {
            return false;
        }
        pg_sys::TransactionIdIsInProgress(xmax)
            || !locked_only && pg_sys::TransactionIdDidCommit(xmax)
    }
}
