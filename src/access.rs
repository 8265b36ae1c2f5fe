//! Who may do what. Every SQL function checks its caller's privileges on the queues it touches, then
//! runs bussig's own statements as the extension's owner (the owner of schema `bussig`), with
//! `search_path` pinned so that no object of the caller's can stand in for a built-in one. The tables
//! stay closed to everyone else; this is what a SECURITY DEFINER function does, except that the caller
//! stays known for the checks.
use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::error::{BusError, BusResult};
use crate::gucs;
use crate::plans::{self, Statement};

/// What a role may do with one queue (`bussig.grant`); a queue's owner may do all of it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Privilege {
    /// send, send_batch, and receiving publishes
    Send,
    /// read, ack, nack, extend_lock, dead_letter, peek, heartbeat
    Consume,
    /// alter, purge, drop, redrive, subscribe, unsubscribe
    Manage,
}

impl Privilege {
    pub const ALL: [Privilege; 3] = [Privilege::Send, Privilege::Consume, Privilege::Manage];

    pub fn name(self) -> &'static str {
        match self {
            Privilege::Send => "send",
            Privilege::Consume => "consume",
            Privilege::Manage => "manage",
        }
    }

    pub fn parse(name: &str) -> Option<Privilege> {
        Privilege::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// What `PermissionDenied` says a caller lacks when any privilege on the queue would do.
pub const ANY_PRIVILEGE: &str = "any privilege";

/// The role a call came from.
pub struct Caller {
    role: pg_sys::Oid,
    /// The extension owner, a member of it, or a superuser: no check applies.
    unrestricted: bool,
}

static HAS_QUEUE_PRIVILEGE: Statement = Statement {
    sql: "SELECT bussig.has_queue_privilege($1::regrole, $2, $3)",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID, pg_sys::TEXTOID],
    writes: false,
};

static MAY_CREATE_QUEUES: Statement = Statement {
    sql: "SELECT bussig.may_create_queues($1::regrole)",
    args: &[pg_sys::OIDOID],
    writes: false,
};

// $3 NULL: any privilege.
static PERMITTED: Statement = Statement {
    sql: "SELECT queue_id FROM bussig.queue
          WHERE queue_id = ANY($2) AND bussig.has_queue_privilege($1::regrole, name, $3)",
    args: &[pg_sys::OIDOID, pg_sys::INT4ARRAYOID, pg_sys::TEXTOID],
    writes: false,
};

// false, not NULL, when the owner's role no longer exists: no row means no queue.
static OWNS_QUEUE: Statement = Statement {
    sql: "SELECT coalesce(pg_catalog.pg_has_role($1, r.oid, 'USAGE'), false)
          FROM bussig.queue q LEFT JOIN pg_catalog.pg_roles r ON r.rolname = q.owner
          WHERE q.name = $2",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID],
    writes: false,
};

impl Caller {
    pub fn role(&self) -> pg_sys::Oid {
        self.role
    }

    /// Fails with 42501 unless the caller holds `privilege` on `queue` (42704 when there is no such queue).
    pub fn require(
        &self,
        client: &mut SpiClient<'_>,
        queue: &str,
        privilege: Privilege,
    ) -> BusResult<()> {
        self.require_some(client, queue, Some(privilege))
    }

    /// As `require`; None asks for any privilege, as seeing a queue in bussig.queues does.
    pub fn require_some(
        &self,
        client: &mut SpiClient<'_>,
        queue: &str,
        privilege: Option<Privilege>,
    ) -> BusResult<()> {
        if self.unrestricted {
            return Ok(());
        }
        let name = privilege.map(Privilege::name);
        let args = [self.role.into(), queue.into(), name.into()];
        match plans::first_value::<bool>(client, &HAS_QUEUE_PRIVILEGE, &args)? {
            Some(true) => Ok(()),
            Some(false) => Err(self.denied(name.unwrap_or(ANY_PRIVILEGE), queue)),
            None => Err(BusError::UnknownQueue(queue.to_string())),
        }
    }

    /// Fails with 42501 unless the caller owns `queue` (or is unrestricted); 42704 for no such queue.
    pub fn require_queue_owner(&self, client: &mut SpiClient<'_>, queue: &str) -> BusResult<()> {
        if self.unrestricted {
            return Ok(());
        }
        let args = [self.role.into(), queue.into()];
        match plans::first_value::<bool>(client, &OWNS_QUEUE, &args)? {
            None => Err(BusError::UnknownQueue(queue.to_string())),
            Some(true) => Ok(()),
            Some(false) => Err(self.denied("ownership", queue)),
        }
    }

    fn denied(&self, privilege: &'static str, queue: &str) -> BusError {
        BusError::PermissionDenied {
            privilege,
            queue: queue.to_string(),
            role: role_name(self.role),
        }
    }

    /// Fails with 42501 unless the extension owner allowed the caller to create queues.
    pub fn require_create(&self, client: &mut SpiClient<'_>, queue: &str) -> BusResult<()> {
        if self.unrestricted {
            return Ok(());
        }
        if plans::first_value::<bool>(client, &MAY_CREATE_QUEUES, &[self.role.into()])?
            == Some(true)
        {
            return Ok(());
        }
        Err(self.denied("create", queue))
    }

    /// The queues among `queue_ids` on which the caller holds `privilege` (any, when None), in order.
    pub fn permitted(
        &self,
        client: &mut SpiClient<'_>,
        mut queue_ids: Vec<i32>,
        privilege: Option<Privilege>,
    ) -> BusResult<Vec<i32>> {
        if self.unrestricted || queue_ids.is_empty() {
            return Ok(queue_ids);
        }
        let args = [
            self.role.into(),
            queue_ids.clone().into(),
            privilege.map(Privilege::name).into(),
        ];
        let allowed: Vec<i32> = plans::first_column(client, &PERMITTED, &args)?;
        queue_ids.retain(|id| allowed.contains(id));
        Ok(queue_ids)
    }
}

fn role_name(role: pg_sys::Oid) -> String {
    unsafe { std::ffi::CStr::from_ptr(pg_sys::GetUserNameFromId(role, false)) }
        .to_string_lossy()
        .into_owned()
}

/// Fails with 42501 unless the caller is the extension owner, a member of it, or a superuser.
pub fn require_owner(function: &'static str) -> BusResult<()> {
    if is_unrestricted(unsafe { pg_sys::GetUserId() }, extension_owner()) {
        return Ok(());
    }
    Err(BusError::OwnerOnly(function))
}

/// The extension owner, its members and superusers may do everything.
fn is_unrestricted(role: pg_sys::Oid, owner: pg_sys::Oid) -> bool {
    unsafe { pg_sys::has_privs_of_role(role, owner) }
}

/// The owner of schema `bussig`, read from the catalog cache on each call (it is two hash lookups).
fn extension_owner() -> pg_sys::Oid {
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

/// Who called, and as whom bussig's work runs.
struct Identity {
    caller: Caller,
    security_context: i32,
    owner: pg_sys::Oid,
}

impl Identity {
    fn current() -> Identity {
        let mut role = pg_sys::InvalidOid;
        let mut security_context = 0;
        unsafe { pg_sys::GetUserIdAndSecContext(&mut role, &mut security_context) };
        let owner = extension_owner();
        Identity {
            caller: Caller {
                role,
                unrestricted: is_unrestricted(role, owner),
            },
            security_context,
            owner,
        }
    }

    /// Runs `work` as the extension owner. An error inside leaves the user switched; the
    /// (sub)transaction abort that follows restores it, as it does for SECURITY DEFINER functions.
    fn as_owner<R>(&self, work: impl FnOnce(&Caller) -> R) -> R {
        unsafe {
            pg_sys::SetUserIdAndSecContext(
                self.owner,
                self.security_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
            )
        };
        let result = work(&self.caller);
        unsafe { pg_sys::SetUserIdAndSecContext(self.caller.role, self.security_context) };
        result
    }
}

/// Runs `work` on an SPI connection as the extension owner, with `search_path` and `jit` pinned, and hands it
/// the caller for its privilege checks. An error inside leaves the settings pinned until the
/// (sub)transaction abort that follows.
pub fn connect<R>(work: impl FnOnce(&mut SpiClient<'_>, &Caller) -> BusResult<R>) -> BusResult<R> {
    connect_as(&Identity::current(), work)
}

/// As `connect`, but when the caller is unrestricted `direct` is tried first, as the extension owner
/// and without the SPI connection and pinned settings: a send that only writes its rows directly
/// saves a tenth of its function's time. `direct` runs no statement, and returns None, having
/// written nothing, when it needs them after all; `work` runs then.
pub fn connect_unless_direct<R>(
    direct: impl FnOnce() -> Option<R>,
    work: impl FnOnce(&mut SpiClient<'_>, &Caller) -> BusResult<R>,
) -> BusResult<R> {
    let identity = Identity::current();
    if identity.caller.unrestricted {
        if let Some(done) = identity.as_owner(|_| direct()) {
            return Ok(done);
        }
    }
    connect_as(&identity, work)
}

fn connect_as<R>(
    identity: &Identity,
    work: impl FnOnce(&mut SpiClient<'_>, &Caller) -> BusResult<R>,
) -> BusResult<R> {
    let pins = Pins::set();
    let result = identity.as_owner(|caller| {
        let _own = plans::own_statements();
        Spi::connect_mut(|client| work(client, caller))
    });
    pins.restore();
    result
}

/// `search_path`: only the system catalogs (and the session's temporary schema at most last, where it
/// can shadow nothing). `jit` off: bussig's statements are short, and a JIT compile, which a generic
/// plan over a large table can look expensive enough to trigger, would cost more than the statement.
struct Pins {
    guc_nest_level: Option<i32>,
}

impl Pins {
    fn set() -> Pins {
        search_path::push();
        let mut guc_nest_level = None;
        let mut pin = |name: &CStr, value: &CStr| {
            guc_nest_level.get_or_insert_with(|| unsafe { pg_sys::NewGUCNestLevel() });
            gucs::set(name, value, pg_sys::GucAction::GUC_ACTION_SAVE);
        };
        if !search_path::BY_OVERRIDE {
            pin(c"search_path", c"pg_catalog, pg_temp");
        }
        if unsafe { pg_sys::jit_enabled } {
            pin(c"jit", c"off");
        }
        Pins { guc_nest_level }
    }

    fn restore(self) {
        if let Some(level) = self.guc_nest_level {
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
        unsafe { pg_sys::PushOverrideSearchPath(&mut path) };
    }

    pub fn pop() {
        unsafe { pg_sys::PopOverrideSearchPath() };
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
mod search_path {
    pub const BY_OVERRIDE: bool = false;

    pub fn push() {}

    pub fn pop() {}
}
