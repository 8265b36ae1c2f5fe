//! Looking up bussig's own relations.
use pgrx::pg_sys;

/// The oid of relation `name` in schema bussig; InvalidOid when either is missing.
pub fn bussig_relation(name: &std::ffi::CStr) -> pg_sys::Oid {
    // SAFETY: catalog look-ups by name inside a transaction; missing objects give InvalidOid, not
    // an error.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"bussig".as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return pg_sys::InvalidOid;
        }
        pg_sys::get_relname_relid(name.as_ptr(), namespace)
    }
}

/// The file (relfilenode) `table` is stored in now: TRUNCATE and table rewrites give it a new one.
pub fn relation_file(table: pg_sys::Oid) -> u32 {
    // SAFETY: the caller found the table in this transaction; the lock taken is the weakest, and is
    // held to the end of the transaction as any reader's, so its file cannot change meanwhile.
    unsafe {
        let relation = pg_sys::relation_open(table, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let file = (*relation).rd_node.relNode.to_u32();
        pg_sys::relation_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        file
    }
}

/// Makes relation `table` depend on the bussig extension, as a user's table on a type it defines:
/// `DROP EXTENSION bussig` refuses while it exists, and `DROP EXTENSION bussig CASCADE` drops it. It
/// stays out of the extension (pg_dump dumps it whole), unlike a member. False when the table was
/// dropped meanwhile.
pub fn depend_on_extension(table: pg_sys::Oid) -> bool {
    // SAFETY: a share lock on a relation by OID, held to the end of the transaction, then a catalog
    // look-up by OID: once the lock is granted, a concurrent DROP has committed or waits for us.
    let exists = unsafe {
        pg_sys::LockRelationOid(table, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        !pg_sys::get_rel_name(table).is_null()
    };
    if !exists {
        return false;
    }
    // SAFETY: records one pg_depend row between two objects that exist in this transaction: the
    // table, locked above, and the extension whose function runs this.
    unsafe {
        let extension = pg_sys::get_extension_oid(c"bussig".as_ptr(), false);
        let dependent = pg_sys::ObjectAddress {
            classId: pg_sys::RelationRelationId,
            objectId: table,
            objectSubId: 0,
        };
        let referenced = pg_sys::ObjectAddress {
            classId: pg_sys::ExtensionRelationId,
            objectId: extension,
            objectSubId: 0,
        };
        pg_sys::recordDependencyOn(
            &dependent,
            &referenced,
            pg_sys::DependencyType::DEPENDENCY_NORMAL,
        );
    }
    true
}
