//! Running bussig's statements as the extension owner with pinned settings, the way a SECURITY
//! DEFINER function runs (see `access`), and who the caller and the owner are.
use std::ffi::CStr;

use pgrx::pg_sys;

use super::gucs;

/// The name of role `role`.
pub fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: GetUserNameFromId returns a palloc'd NUL-terminated name, or raises an ERROR for an
    // unknown role.
    unsafe { std::ffi::CStr::from_ptr(pg_sys::GetUserNameFromId(role, false)) }
        .to_string_lossy()
        .into_owned()
}

/// The current user and security context.
pub fn user_and_context() -> (pg_sys::Oid, i32) {
    let mut role = pg_sys::InvalidOid;
    let mut security_context = 0;
    // SAFETY: both are out-parameters this backend's state is copied into.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut role, &mut security_context) };
    (role, security_context)
}

/// Makes `role` the current user; `local` marks the change as one the abort of an error undoes, as
/// for a SECURITY DEFINER function.
pub fn switch_to(role: pg_sys::Oid, security_context: i32, local: bool) {
    let context = if local {
        security_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
    } else {
        security_context
    };
    // SAFETY: `role` is an existing role (the caller or the schema's owner), and the context is the
    // one read with it, so switching back restores the state exactly.
    unsafe { pg_sys::SetUserIdAndSecContext(role, context) };
}

/// The extension owner, its members and superusers may do everything.
pub fn is_unrestricted(role: pg_sys::Oid, owner: pg_sys::Oid) -> bool {
    // SAFETY: a catalog look-up by two role ids; unknown ids are simply not members.
    unsafe { pg_sys::has_privs_of_role(role, owner) }
}

/// The owner of schema `bussig`, read from the catalog cache on each call (it is two hash lookups).
pub fn extension_owner() -> pg_sys::Oid {
    // SAFETY: a syscache look-up inside a transaction; the tuple is checked for NULL and released
    // after its owner field is copied.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"bussig".as_ptr(), false);
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            pg_sys::Datum::from(namespace),
        );
        if tuple.is_null() {
            pgrx::error!("schema bussig vanished while in use");
        }
        let owner =
            (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_namespace>(tuple)).nspowner;
        pg_sys::ReleaseSysCache(tuple);
        owner
    }
}

/// `search_path`: only the system catalogs (and the session's temporary schema at most last, where it
/// can shadow nothing). `jit` off: bussig's statements are short, and a JIT compile, which a generic
/// plan over a large table can look expensive enough to trigger, would cost more than the statement.
pub struct Pins {
    guc_nest_level: Option<i32>,
}

impl Pins {
    pub fn set() -> Pins {
        search_path::push();
        let mut guc_nest_level = None;
        let mut pin = |name: &CStr, value: &CStr| {
            // SAFETY: inside a transaction; the level is closed by `restore`, or by the abort of an
            // error.
            guc_nest_level.get_or_insert_with(|| unsafe { pg_sys::NewGUCNestLevel() });
            gucs::set(name, value, pg_sys::GucAction::GUC_ACTION_SAVE);
        };
        if !search_path::BY_OVERRIDE {
            pin(c"search_path", c"pg_catalog, pg_temp");
        }
        // SAFETY: a plain read of a backend-local setting.
        if unsafe { pg_sys::jit_enabled } {
            pin(c"jit", c"off");
        }
        Pins { guc_nest_level }
    }

    pub fn restore(self) {
        if let Some(level) = self.guc_nest_level {
            // SAFETY: the level was opened by `set` in this transaction and is closed once.
            unsafe { pg_sys::AtEOXact_GUC(true, level) };
        }
        search_path::pop();
    }
}

/// Up to PostgreSQL 16 the search path can be overridden without the GUC machinery, which on those
/// versions re-parses the setting on every change, walks every setting to restore it, and makes the
/// calling statement's plan recompute the caller's path: together 5% of a `send`. PostgreSQL 17
/// dropped the override stack and caches parsed paths instead.
#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
mod search_path {
    use pgrx::pg_sys;

    pub const BY_OVERRIDE: bool = true;

    pub fn push() {
        // No explicit schema, so nothing can be created in it: every bussig statement names its schema.
        let mut path = pg_sys::OverrideSearchPath {
            schemas: std::ptr::null_mut(),
            addCatalog: true,
            addTemp: false,
            generation: 0,
        };
        // SAFETY: PostgreSQL copies the path; `pop` removes it, or the abort of an error does.
        unsafe { pg_sys::PushOverrideSearchPath(&mut path) };
    }

    pub fn pop() {
        // SAFETY: pops the path `push` pushed in the same call.
        unsafe { pg_sys::PopOverrideSearchPath() };
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
mod search_path {
    pub const BY_OVERRIDE: bool = false;

    pub fn push() {}

    pub fn pop() {}
}
