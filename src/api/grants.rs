//! Who may use which queue: grant and revoke privileges on queues, and the right to create queues.
use pgrx::pg_sys::{self, panic::ErrorReport};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::access::{self, Privilege};
use crate::error::{BusError, BusResult};
use crate::plans::{self, Statement};
use crate::stream::{self, StreamPrivilege};
use crate::validate::{self, required};

static ROLE_EXISTS: Statement = Statement {
    sql: "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = $1)",
    args: &[pg_sys::TEXTOID],
    writes: false,
};

/// GRANT and REVOKE for one kind of object (`queue`, `stream`): rows of `bussig.<kind>_grant` for the
/// object named $1, grantee $2, privileges $3.
macro_rules! grant_statements {
    ($kind:literal, $grant:ident, $revoke:ident) => {
        static $grant: Statement = Statement {
            sql: concat!(
                "INSERT INTO bussig.",
                $kind,
                "_grant (",
                $kind,
                "_id, grantee, privilege)
                 SELECT o.",
                $kind,
                "_id, $2, p FROM bussig.",
                $kind,
                " o, unnest($3::text[]) AS p
                 WHERE o.name = $1 ON CONFLICT DO NOTHING"
            ),
            args: &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTARRAYOID],
            writes: true,
        };

        static $revoke: Statement = Statement {
            sql: concat!(
                "DELETE FROM bussig.",
                $kind,
                "_grant g USING bussig.",
                $kind,
                " o
                 WHERE g.",
                $kind,
                "_id = o.",
                $kind,
                "_id AND o.name = $1 AND g.grantee = $2
                   AND g.privilege = ANY($3)"
            ),
            args: &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTARRAYOID],
            writes: true,
        };
    };
}

grant_statements!("queue", GRANT, REVOKE);
grant_statements!("stream", GRANT_STREAM, REVOKE_STREAM);

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

/// The privileges named, each once, from `all_names` (a queue's or a stream's); `all` stands for
/// every one. None (SQL NULL) is all of them.
fn privilege_names(
    privileges: Option<Vec<Option<String>>>,
    all_names: &[&'static str],
) -> BusResult<Vec<String>> {
    let Some(privileges) = privileges else {
        return Ok(all_names.iter().map(|name| name.to_string()).collect());
    };
    if privileges.is_empty() {
        return Err(BusError::invalid("privileges", "the array is empty"));
    }
    let mut names = Vec::new();
    for privilege in privileges {
        let privilege = required(privilege, "every element of privileges")?;
        let chosen: Vec<&str> = match privilege.as_str() {
            "all" => all_names.to_vec(),
            name if all_names.contains(&name) => vec![name],
            name => {
                return Err(BusError::invalid(
                    "privileges",
                    format!(
                        "unknown privilege {name:?}: use {} or all",
                        all_names.join(", ")
                    ),
                ))
            }
        };
        for privilege in chosen {
            if !names.iter().any(|name| name == privilege) {
                names.push(privilege.to_string());
            }
        }
    }
    Ok(names)
}

fn queue_privileges() -> Vec<&'static str> {
    Privilege::ALL.iter().map(|p| p.name()).collect()
}

fn stream_privileges() -> Vec<&'static str> {
    StreamPrivilege::ALL.iter().map(|p| p.name()).collect()
}

/// Grants privileges on a queue to a role (or `public`): `send`, `consume` (read, ack, nack,
/// extend_lock, dead_letter, peek, heartbeat), `manage` (alter, purge, drop, redrive, subscribe,
/// unsubscribe), or `all`. Only the queue's owner or the extension's owner may grant. When no queue
/// has the name, a stream's: `append`, `read`, `manage` or `all`.
#[pg_extern]
fn grant(
    queue: Option<&str>,
    role: Option<&str>,
    privileges: Option<Vec<Option<String>>>,
) -> Result<(), ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let role = required(role, "role")?;
    let privileges = Some(required(privileges, "privileges")?);
    Ok(change_privileges(
        &GRANT,
        &GRANT_STREAM,
        queue,
        role,
        privileges,
    )?)
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
    Ok(change_privileges(
        &REVOKE,
        &REVOKE_STREAM,
        queue,
        role,
        privileges,
    )?)
}

/// Runs GRANT or REVOKE for `role` on the queue named `name`, which only the queue's owner may; or,
/// when no queue has that name, on the stream, which only the stream's owner may.
fn change_privileges(
    on_queue: &'static Statement,
    on_stream: &'static Statement,
    name: &str,
    role: &str,
    privileges: Option<Vec<Option<String>>>,
) -> BusResult<()> {
    access::connect(|client, caller| {
        let statement = if crate::queue::find(client, name)?.is_some()
            || stream::find(client, name)?.is_none()
        {
            crate::queue::require(client, name)?;
            caller.require_queue_owner(client, name)?;
            on_queue
        } else {
            stream::require_owner(client, caller, name)?;
            on_stream
        };
        let vocabulary = if std::ptr::eq(statement, on_queue) {
            queue_privileges()
        } else {
            stream_privileges()
        };
        let privileges = privilege_names(privileges, &vocabulary)?;
        let role = grantee(client, role)?;
        plans::run(
            client,
            statement,
            &[name.into(), role.into(), privileges.into()],
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
