//! The privileges a restricted role was found to hold, kept per backend: its next calls check them
//! without a statement, and its sends take the direct path a superuser's take. Only "held" is kept;
//! every refusal comes from the statement.
//!
//! An answer stays good while nothing it was read from changed: bussig's catalog (queue and stream
//! rows, their grants), whose triggers move the generation of `pg::invalidation`, and the roles,
//! their memberships and the owner of schema `bussig`, whose changes PostgreSQL announces itself.
//! Both are taken in before every check, so a grant or revoke counts from the first call after its
//! transaction committed, and a long poll sees one that committed while it slept. As with
//! PostgreSQL's own privilege checks, a call that starts in the instant between a revoke's commit
//! and the arrival of its invalidation still sees the grant.
use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use crate::error::BusResult;
use crate::pg::{invalidation, xact};

/// What a privilege is held on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum On {
    Queue,
    Stream,
}

/// The state of bussig's catalog and of the roles an answer was read under.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Version {
    catalog: u64,
    roles: u64,
}

/// One kept answer besides its object's name: the role held the privilege (any, when None).
type Answer = (On, pg_sys::Oid, Option<&'static str>);

/// Names kept at most; past that the backend starts over.
const LIMIT: usize = 1_000;

thread_local! {
    /// The answers kept, by the name of their queue or stream, and the version they were read under.
    static HELD: RefCell<(Option<Version>, HashMap<String, Vec<Answer>>)> =
        RefCell::new((None, HashMap::new()));
}

/// The version now, once the changes other transactions committed have been applied; None when
/// knowing it takes a statement (see `pg::invalidation::known_generation`).
pub fn version_known() -> Option<Version> {
    let catalog = invalidation::known_generation()?;
    Some(Version {
        catalog,
        roles: invalidation::roles_generation(),
    })
}

/// The version now, with a statement when it takes one.
pub fn version(client: &mut SpiClient<'_>) -> BusResult<Version> {
    let catalog = invalidation::generation(client)?;
    Ok(Version {
        catalog,
        roles: invalidation::roles_generation(),
    })
}

/// Whether `role` was found to hold `privilege` on `name` under the version `now`.
pub fn is_held(
    now: Version,
    on: On,
    role: pg_sys::Oid,
    name: &str,
    privilege: Option<&'static str>,
) -> bool {
    HELD.with(|held| {
        let held = held.borrow();
        held.0 == Some(now)
            && held
                .1
                .get(name)
                .is_some_and(|answers| answers.contains(&(on, role, privilege)))
    })
}

/// Keeps a "held" a statement gave under `read_under` (the version taken before it ran): only when
/// nothing changed since, and the statement's snapshot was new (one kept for the transaction may
/// predate a change whose invalidation has already arrived).
pub fn remember(
    read_under: Version,
    on: On,
    role: pg_sys::Oid,
    name: &str,
    privilege: Option<&'static str>,
) {
    if xact::snapshot_is_fixed() || version_known() != Some(read_under) {
        return;
    }
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        if held.0 != Some(read_under) || held.1.len() >= LIMIT {
            *held = (Some(read_under), HashMap::new());
        }
        let answers = held.1.entry(name.to_string()).or_default();
        if !answers.contains(&(on, role, privilege)) {
            answers.push((on, role, privilege));
        }
    });
}
