//! Who may use which queue: grant and revoke privileges on queues, and the right to create queues.
use pgrx::pg_sys::{self, panic::ErrorReport};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::access::{self, Privilege};
use crate::error::{BusError, BusResult};
use crate::plans::{self, Statement};
use crate::validate::{self, required};

static ROLE_EXISTS: Statement = Statement {
    sql: "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = $1)",
    args: &[pg_sys::TEXTOID],
    writes: false,
};

static GRANT: Statement = Statement {
    sql: "INSERT INTO bussig.queue_grant (queue_id, grantee, privilege)
          SELECT q.queue_id, $2, p FROM bussig.queue q, unnest($3::text[]) AS p WHERE q.name = $1
          ON CONFLICT DO NOTHING",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTARRAYOID],
    writes: true,
};

static REVOKE: Statement = Statement {
    sql: "DELETE FROM bussig.queue_grant g USING bussig.queue q
          WHERE g.queue_id = q.queue_id AND q.name = $1 AND g.grantee = $2 AND g.privilege = ANY($3)",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTARRAYOID],
    writes: true,
};

static GRANT_CREATE: Statement = Statement {
    sql: "INSERT INTO bussig.queue_creator (grantee) VALUES ($1) ON CONFLICT DO NOTHING",
    args: &[pg_sys::TEXTOID],
    writes: true,
};

static REVOKE_CREATE: Statement = Statement {
    sql: "DELETE FROM bussig.queue_creator WHERE grantee = $1",
    args: &[pg_sys::TEXTOID],
    writes: true,
};

/// The role a grant names: an existing role, or `public` (any case) for every role.
fn grantee(client: &mut SpiClient<'_>, role: &str) -> BusResult<String> {
    if role.eq_ignore_ascii_case("public") {
        return Ok("public".into());
    }
    if plans::first_value::<bool>(client, &ROLE_EXISTS, &[role.into()])? != Some(true) {
        return Err(BusError::UnknownRole(role.to_string()));
    }
    Ok(role.to_string())
}

/// The privileges named, each once; `all` stands for every one. None (SQL NULL) is all of them.
fn privilege_names(privileges: Option<Vec<Option<String>>>) -> BusResult<Vec<String>> {
    let Some(privileges) = privileges else {
        return Ok(Privilege::ALL
            .iter()
            .map(|p| p.name().to_string())
            .collect());
    };
    if privileges.is_empty() {
        return Err(BusError::invalid("privileges", "the array is empty"));
    }
    let mut names = Vec::new();
    for privilege in privileges {
        let privilege = required(privilege, "every element of privileges")?;
        let chosen = match privilege.as_str() {
            "all" => Privilege::ALL.to_vec(),
            name => vec![Privilege::parse(name).ok_or_else(|| {
                BusError::invalid(
                    "privileges",
                    format!("unknown privilege {name:?}: use send, consume, manage or all"),
                )
            })?],
        };
        for privilege in chosen {
            if !names.iter().any(|name| name == privilege.name()) {
                names.push(privilege.name().to_string());
            }
        }
    }
    Ok(names)
}

/// Grants privileges on a queue to a role (or `public`): `send`, `consume` (read, ack, nack,
/// extend_lock, dead_letter, peek, heartbeat), `manage` (alter, purge, drop, redrive, subscribe,
/// unsubscribe), or `all`. Only the queue's owner or the extension's owner may grant.
#[pg_extern]
fn grant(
    queue: Option<&str>,
    role: Option<&str>,
    privileges: Option<Vec<Option<String>>>,
) -> Result<(), ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let role = required(role, "role")?;
    let privileges = privilege_names(Some(required(privileges, "privileges")?))?;
    Ok(change_privileges(&GRANT, queue, role, privileges)?)
}

/// Takes privileges back; all of them when none are named. Revoking what was never granted is no error.
#[pg_extern]
fn revoke(
    queue: Option<&str>,
    role: Option<&str>,
    privileges: default!(Option<Vec<Option<String>>>, "NULL"),
) -> Result<(), ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let role = required(role, "role")?;
    let privileges = privilege_names(privileges)?;
    Ok(change_privileges(&REVOKE, queue, role, privileges)?)
}

/// Runs GRANT or REVOKE for `role` on `queue`, which only the queue's owner may.
fn change_privileges(
    statement: &'static Statement,
    queue: &str,
    role: &str,
    privileges: Vec<String>,
) -> BusResult<()> {
    access::connect(|client, caller| {
        crate::queue::require(client, queue)?;
        caller.require_queue_owner(client, queue)?;
        let role = grantee(client, role)?;
        plans::run(
            client,
            statement,
            &[queue.into(), role.into(), privileges.into()],
        )?;
        Ok(())
    })
}

/// Runs a change of who may create queues; only the extension's owner may.
fn change_creators(
    role: Option<&str>,
    function: &'static str,
    statement: &'static Statement,
) -> BusResult<()> {
    let role = required(role, "role")?;
    access::require_owner(function)?;
    access::connect(|client, _| {
        let role = grantee(client, role)?;
        plans::run(client, statement, &[role.into()])?;
        Ok(())
    })
}

/// Lets a role (or `public`) create queues, which it then owns. Only the extension's owner may.
#[pg_extern]
fn grant_create_queues(role: Option<&str>) -> Result<(), ErrorReport> {
    Ok(change_creators(role, "grant_create_queues", &GRANT_CREATE)?)
}

/// Takes the right to create queues back; the queues the role created stay its own.
#[pg_extern]
fn revoke_create_queues(role: Option<&str>) -> Result<(), ErrorReport> {
    Ok(change_creators(
        role,
        "revoke_create_queues",
        &REVOKE_CREATE,
    )?)
}
