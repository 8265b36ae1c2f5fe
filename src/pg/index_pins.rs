//! Every kept statement reads `bussig.message` through the one index its alias names, whatever the
//! statistics say. A queue created after the last ANALYZE looks to the planner like one row, so a plan
//! made then scanned `message_delivery_order` on `queue_id` for an ack by id and filtered the whole
//! queue on every call. Costs cannot be trusted for a table whose contents turn over every few seconds;
//! the access path of each reference is part of the statement's design, so the statement says it:
//!
//! | alias      | index                    | for                                             |
//! |------------|--------------------------|-------------------------------------------------|
//! | `by_id`    | `message_pkey`           | settling listed messages                        |
//! | `in_order` | `message_delivery_order` | reading, peeking, a whole queue                 |
//! | `by_lock`  | `message_final_lock`     | last deliveries whose lock ran out (the worker) |
//! | `by_body`  | `message_body`           | messages of a shared body (the worker)          |
//! | `by_ctid`  | none: the row's ctid     | a row this statement has just locked            |
//!
//! The planner is shown only the named index (`get_relation_info`), and kept statements are planned
//! without sequential or bitmap scans (`plans.rs`), so the index, in the order it gives, is the only way
//! in. A reference whose alias names no pin is planned as usual; `tests/plan_stability.rs` measures the
//! rows each verb visits in the states where a plan could go wrong.
use std::ffi::CStr;

use pgrx::pg_sys;

/// How a reference of `bussig.message` is to be read, by its alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pin {
    Index(&'static CStr),
    Ctid,
}

/// The pin an alias names: the alias itself, or it followed by `_` and anything (`in_order_head`), so
/// that one statement can read the table twice the same way.
fn pin_for(alias: &CStr) -> Option<Pin> {
    const PINS: [(&[u8], Pin); 5] = [
        (b"by_id", Pin::Index(c"message_pkey")),
        (b"in_order", Pin::Index(c"message_delivery_order")),
        (b"by_lock", Pin::Index(c"message_final_lock")),
        (b"by_body", Pin::Index(c"message_body")),
        (b"by_ctid", Pin::Ctid),
    ];
    let alias = alias.to_bytes();
    PINS.iter().find_map(|&(name, pin)| {
        let rest = alias.strip_prefix(name)?;
        (rest.is_empty() || rest.starts_with(b"_")).then_some(pin)
    })
}

/// Leaves in `rel.indexlist` only the index the reference's alias pins, if it names one that exists.
/// `rel` is a reference of `bussig.message` being planned for a kept statement.
pub fn apply(root: &pg_sys::PlannerInfo, rel: &mut pg_sys::RelOptInfo) {
    // SAFETY: the planner fills simple_rte_array for every base relation index before it asks for
    // relation info, and each range table entry has its eref.
    let alias = unsafe {
        let rte = *root.simple_rte_array.add(rel.relid as usize);
        if rte.is_null() || (*rte).eref.is_null() || (*(*rte).eref).aliasname.is_null() {
            return;
        }
        CStr::from_ptr((*(*rte).eref).aliasname)
    };
    let wanted = match pin_for(alias) {
        None => return,
        Some(Pin::Ctid) => None,
        Some(Pin::Index(name)) => match crate::pg::catalog::bussig_relation(name) {
            index if index == pg_sys::InvalidOid => return,
            index => Some(index),
        },
    };
    // SAFETY: indexlist is a List of IndexOptInfo pointers in the planner's memory; a new List of some
    // of them replaces it, as a get_relation_info hook may.
    unsafe {
        let indexes = pgrx::PgList::<pg_sys::IndexOptInfo>::from_pg(rel.indexlist);
        let mut kept = pgrx::PgList::<pg_sys::IndexOptInfo>::new();
        for index in indexes.iter_ptr() {
            if Some((*index).indexoid) == wanted {
                kept.push(index);
            }
        }
        if wanted.is_some() && kept.is_empty() {
            return;
        }
        rel.indexlist = kept.into_pg();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_alias_names_one_way_in() {
        assert_eq!(pin_for(c"by_id"), Some(Pin::Index(c"message_pkey")));
        assert_eq!(
            pin_for(c"in_order"),
            Some(Pin::Index(c"message_delivery_order"))
        );
        assert_eq!(pin_for(c"by_ctid"), Some(Pin::Ctid));
        assert_eq!(
            pin_for(c"in_order_head"),
            Some(Pin::Index(c"message_delivery_order"))
        );
        assert_eq!(pin_for(c"in_orderly"), None);
        assert_eq!(pin_for(c"m"), None);
    }
}
