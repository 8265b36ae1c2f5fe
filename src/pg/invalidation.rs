//! How a backend's caches of bussig's own catalog (queue definitions, the subscription trie) learn
//! of changes. Triggers on `bussig.queue` and `bussig.subscription` send a relcache invalidation of
//! `bussig.subscription`: PostgreSQL delivers it to every backend when the changing transaction
//! commits, to the changing backend at once, and to it again if that transaction aborts. Each
//! delivery bumps a generation number; a cache entry is good while the generation it was loaded
//! at is current.
//!
//! Roles, role memberships and the owner of schema `bussig`, which the privileges a backend keeps
//! (`access::held`) depend on, are watched through PostgreSQL's own invalidations of pg_authid,
//! pg_auth_members, pg_namespace and pg_database.
//!
//! The direct insert's copy of `bussig.message` (its layout, indexes and id sequence) is watched the
//! same way, through the relcache invalidations PostgreSQL itself sends when any of those change.
use std::cell::{Cell, RefCell};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::error::BusResult;
use crate::plans::{self, Statement};

thread_local! {
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// The OID of bussig.subscription, or InvalidOid until looked up (again) after a change: the
    /// extension may have been dropped and created anew.
    static WATCHED: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    /// The relations the message-table copy was built from, and whether one has changed since.
    static MESSAGE_TABLE: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
    static MESSAGE_TABLE_STALE: Cell<bool> = const { Cell::new(true) };
    static ROLE_CALLBACKS_REGISTERED: Cell<bool> = const { Cell::new(false) };
    static ROLES_GENERATION: Cell<u64> = const { Cell::new(0) };
}

static SUBSCRIPTION_TABLE: Statement = Statement {
    sql: "SELECT to_regclass('bussig.subscription')::oid",
    args: &[],
    writes: false,
};

fn subscription_table(client: &mut SpiClient<'_>) -> BusResult<Option<pg_sys::Oid>> {
    Ok(plans::first_value(client, &SUBSCRIPTION_TABLE, &[])?)
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_argument: pg_sys::Datum, relid: pg_sys::Oid) {
    let watched = WATCHED.with(Cell::get);
    if relid == pg_sys::InvalidOid || relid == watched || watched == pg_sys::InvalidOid {
        bump();
    }
    if relid == pg_sys::InvalidOid
        || MESSAGE_TABLE.with(|relations| relations.borrow().contains(&relid))
    {
        MESSAGE_TABLE_STALE.with(|stale| stale.set(true));
    }
}

fn register_callback() {
    if !CALLBACK_REGISTERED.with(|registered| registered.replace(true)) {
        // SAFETY: registered once per backend; the callback is a plain function that lives as long
        // as the library.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(
                Some(on_relcache_invalidation),
                pg_sys::Datum::from(0),
            )
        };
    }
}

/// Starts watching the relations a new copy of the message table is built from; more can be added
/// while it is built. Any invalidation from here on makes the copy stale.
pub fn watch_message_table(relations: &[pg_sys::Oid]) {
    register_callback();
    MESSAGE_TABLE.with(|watched| *watched.borrow_mut() = relations.to_vec());
    MESSAGE_TABLE_STALE.with(|stale| stale.set(false));
}

pub fn also_watch_message_table(relation: pg_sys::Oid) {
    MESSAGE_TABLE.with(|watched| watched.borrow_mut().push(relation));
}

/// Whether none of the watched relations changed since `watch_message_table`. Invalidations are
/// applied when a lock is taken: ask after locking the table.
pub fn message_table_is_current() -> bool {
    !MESSAGE_TABLE_STALE.with(Cell::get)
}

fn bump() {
    GENERATION.with(|generation| generation.set(generation.get() + 1));
    WATCHED.with(|watched| watched.set(pg_sys::InvalidOid));
}

/// The current generation, once the changes other transactions committed have been applied.
pub fn generation(client: &mut SpiClient<'_>) -> BusResult<u64> {
    if let Some(generation) = known_generation() {
        return Ok(generation);
    }
    let table = subscription_table(client)?.unwrap_or(pg_sys::InvalidOid);
    WATCHED.with(|watched| watched.set(table));
    Ok(GENERATION.with(Cell::get))
}

/// The current generation, as `generation` gives it, when it needs no statement to find out: None
/// until bussig.subscription has been looked up again after a change.
pub fn known_generation() -> Option<u64> {
    register_callback();
    // SAFETY: processes pending invalidations, as any catalog access does, inside a transaction.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    (WATCHED.with(Cell::get) != pg_sys::InvalidOid).then(|| GENERATION.with(Cell::get))
}

/// Whether what was loaded at `generation` may be kept: nothing changed while it loaded, and it was
/// not read under a transaction-long snapshot, which may predate changes already announced.
pub fn may_keep(generation: u64) -> bool {
    !crate::pg::xact::snapshot_is_fixed() && GENERATION.with(Cell::get) == generation
}

#[pg_guard]
unsafe extern "C-unwind" fn on_roles_invalidation(
    _argument: pg_sys::Datum,
    _cache: std::ffi::c_int,
    _hash: u32,
) {
    ROLES_GENERATION.with(|generation| generation.set(generation.get() + 1));
}

/// A number that moves whenever a role, a role membership, a schema's or the database's owner may
/// have changed, once the changes other transactions committed have been applied.
pub fn roles_generation() -> u64 {
    if !ROLE_CALLBACKS_REGISTERED.with(|registered| registered.replace(true)) {
        // The database's owner too: pg_has_role counts it a member of pg_database_owner.
        use pg_sys::SysCacheIdentifier::{AUTHMEMROLEMEM, AUTHOID, DATABASEOID, NAMESPACEOID};
        for cache in [AUTHOID, AUTHMEMROLEMEM, NAMESPACEOID, DATABASEOID] {
            // SAFETY: registered once per backend (four of PostgreSQL's 64 slots); the callback is a
            // plain function that lives as long as the library.
            unsafe {
                pg_sys::CacheRegisterSyscacheCallback(
                    cache as std::ffi::c_int,
                    Some(on_roles_invalidation),
                    pg_sys::Datum::from(0),
                )
            };
        }
    }
    // SAFETY: processes pending invalidations, as any catalog access does, inside a transaction.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    ROLES_GENERATION.with(Cell::get)
}

/// Called by the triggers on queues and subscriptions: every backend drops its cached copies (this
/// one at once, the others when this transaction commits).
pub fn invalidate_routing() -> Result<(), pgrx::pg_sys::panic::ErrorReport> {
    bump();
    if let Some(table) = Spi::connect_mut(subscription_table)? {
        // SAFETY: the relation exists (it was just looked up); the invalidation is sent at commit.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(table) };
    }
    Ok(())
}
