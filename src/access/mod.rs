//! Who may do what. Every SQL function checks its caller's privileges on the queues it touches, then
//! runs bussig's own statements as the extension's owner (the owner of schema `bussig`), with
//! `search_path` pinned so that no object of the caller's can stand in for a built-in one. The tables
//! stay closed to everyone else; this is what a SECURITY DEFINER function does, except that the caller
//! stays known for the checks.
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::error::{BusError, BusResult};
use crate::pg::identity;
use crate::plans::{self, Statement};

pub mod held;
use held::On;

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
}

/// What `PermissionDenied` says a caller lacks when any privilege on the queue would do.
pub const ANY_PRIVILEGE: &str = "any privilege";

/// The role a call came from.
pub struct Caller {
    role: pg_sys::Oid,
    /// The extension owner, a member of it, or a superuser: no check applies.
    unrestricted: bool,
}

// A writing statement, so that it reads in a new snapshot: a long poll checks again after each
// sleep, and must see a revoke that committed during it. The function's body is planned into this
// statement (see its comment in sql/schema.sql).
static HAS_QUEUE_PRIVILEGE: Statement = Statement {
    sql: "SELECT held FROM bussig.queue_privilege_of($1, $2, $3) AS held",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID, pg_sys::TEXTOID],
    writes: true,
};

static MAY_CREATE_QUEUES: Statement = Statement {
    sql: "SELECT bussig.may_create_queues($1::regrole)",
    args: &[pg_sys::OIDOID],
    writes: false,
};

// $3 NULL: any privilege.
static PERMITTED: Statement = Statement {
    sql: "SELECT q.queue_id FROM bussig.queue q
          WHERE q.queue_id = ANY($2)
            AND EXISTS (SELECT FROM bussig.queue_privilege_of($1, q.name, $3) AS held WHERE held)",
    args: &[pg_sys::OIDOID, pg_sys::INT4ARRAYOID, pg_sys::TEXTOID],
    writes: false,
};

/// Whether role $1 owns the `$table` row named $2 (a queue, a stream): false, not NULL, when the
/// owner's role no longer exists; no row when nothing has that name.
macro_rules! owns_statement {
    ($table:literal) => {
        Statement {
            sql: concat!(
                "SELECT coalesce(pg_catalog.pg_has_role($1, r.oid, 'USAGE'), false)
                 FROM bussig.",
                $table,
                " o LEFT JOIN pg_catalog.pg_roles r ON r.rolname = o.owner WHERE o.name = $2"
            ),
            args: &[pg_sys::OIDOID, pg_sys::TEXTOID],
            writes: false,
        }
    };
}
pub(crate) use owns_statement;

static OWNS_QUEUE: Statement = owns_statement!("queue");

impl Caller {
    pub fn role(&self) -> pg_sys::Oid {
        self.role
    }

    /// The extension owner, a member of it, or a superuser: no privilege check applies.
    pub fn unrestricted(&self) -> bool {
        self.unrestricted
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
        match self.holds(client, (On::Queue, &HAS_QUEUE_PRIVILEGE), queue, name)? {
            Some(true) => Ok(()),
            Some(false) => Err(self.denied(name.unwrap_or(ANY_PRIVILEGE), queue)),
            None => Err(BusError::UnknownQueue(queue.to_string())),
        }
    }

    /// Whether the caller holds `privilege` (any, when None) on the queue or stream `name`, from
    /// what this backend keeps (`held`) or else by `check`; None when there is no such object.
    pub fn holds(
        &self,
        client: &mut SpiClient<'_>,
        (on, check): (On, &'static Statement),
        name: &str,
        privilege: Option<&'static str>,
    ) -> BusResult<Option<bool>> {
        let version = held::version(client)?;
        if held::is_held(version, on, self.role, name, privilege) {
            return Ok(Some(true));
        }
        let args = [self.role.into(), name.into(), privilege.into()];
        let answer = plans::first_value::<bool>(client, check, &args)?;
        if answer == Some(true) {
            held::remember(version, on, self.role, name, privilege);
        }
        Ok(answer)
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
            role: identity::role_name(self.role),
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

/// Fails with 42501 unless the caller is the extension owner, a member of it, or a superuser.
pub fn require_owner(function: &'static str) -> BusResult<()> {
    if identity::is_unrestricted(identity::user_and_context().0, identity::extension_owner()) {
        return Ok(());
    }
    Err(BusError::OwnerOnly(function))
}

/// Who called, and as whom bussig's work runs.
struct Identity {
    caller: Caller,
    security_context: i32,
    owner: pg_sys::Oid,
}

impl Identity {
    fn current() -> Identity {
        let (role, security_context) = identity::user_and_context();
        let owner = identity::extension_owner();
        Identity {
            caller: Caller {
                role,
                unrestricted: identity::is_unrestricted(role, owner),
            },
            security_context,
            owner,
        }
    }

    /// Runs `work` as the extension owner. An error inside leaves the user switched; the
    /// (sub)transaction abort that follows restores it, as it does for SECURITY DEFINER functions.
    fn as_owner<R>(&self, work: impl FnOnce(&Caller) -> R) -> R {
        identity::switch_to(self.owner, self.security_context, true);
        let result = work(&self.caller);
        identity::switch_to(self.caller.role, self.security_context, false);
        result
    }
}

/// Runs `work` on an SPI connection as the extension owner, with `search_path` and `jit` pinned, and hands it
/// the caller for its privilege checks. An error inside leaves the settings pinned until the
/// (sub)transaction abort that follows.
pub fn connect<R>(work: impl FnOnce(&mut SpiClient<'_>, &Caller) -> BusResult<R>) -> BusResult<R> {
    connect_as(&Identity::current(), work)
}

/// As `connect`, but when the caller is unrestricted, or was found to hold `privilege` on `queue`
/// (`held`), `direct` is tried first, as the extension owner and without the SPI connection and
/// pinned settings: a send that only writes its rows directly saves a tenth of its function's time.
/// `direct` runs no statement, and returns None, having written nothing, when it needs them after
/// all; `work` runs then.
pub fn connect_unless_direct<R>(
    (queue, privilege): (&str, Privilege),
    direct: impl FnOnce() -> Option<R>,
    work: impl FnOnce(&mut SpiClient<'_>, &Caller) -> BusResult<R>,
) -> BusResult<R> {
    let identity = Identity::current();
    let caller = &identity.caller;
    let allowed = caller.unrestricted
        || held::version_known().is_some_and(|now| {
            held::is_held(now, On::Queue, caller.role, queue, Some(privilege.name()))
        });
    if allowed {
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
    let pins = identity::Pins::set();
    let result = identity.as_owner(|caller| {
        let _own = crate::pg::planner::own_statements();
        Spi::connect_mut(|client| work(client, caller))
    });
    pins.restore();
    result
}
