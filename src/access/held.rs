//! The privileges a restricted role was found to hold, kept per backend: its next calls check them
//! without a statement, and its sends take the direct path a superuser's take. Only "held" is kept;
//! every refusal comes from the statement.
//!
//! An answer stays good while nothing it was read from changed: bussig's catalog (queue and stream
//! rows, their grants), whose triggers move the generation of `pg::invalidation`, and the roles,
//! their memberships and the owners of schema `bussig` and of the database, whose changes
//! PostgreSQL announces itself. Creating a queue or stream announces nothing, so an answer read in a
//! transaction counts only once it commits. Both are taken in before every check, so a grant or
//! revoke counts from the first call after its transaction committed, and a long poll sees one that
//! committed while it slept. As with
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

/// The answers of one backend, all read under `version`.
#[derive(Default)]
struct Held {
    version: Option<Version>,
    /// Answers read by transactions that committed, by the name of their queue or stream.
    kept: HashMap<String, Vec<Answer>>,
    /// Answers read by the transaction under way, with the subtransaction that read them: kept when
    /// it commits, dropped when it (or that subtransaction) aborts, for what they were read from may
    /// be its own work rolled back (a queue it created, whose name another role may take next).
    pending: Vec<(String, Answer, pg_sys::SubTransactionId)>,
}

impl Held {
    fn has(&self, name: &str, answer: Answer) -> bool {
        self.kept
            .get(name)
            .is_some_and(|answers| answers.contains(&answer))
            || self
                .pending
                .iter()
                .any(|(pending, held, _)| pending == name && *held == answer)
    }
}

thread_local! {
    static HELD: RefCell<Held> = RefCell::new(Held::default());
}

/// The version now, once the changes other transactions committed have been applied; None when
/// knowing it takes a statement (see `pg::invalidation::known_generation`).
pub fn version_known() -> Option<Version> {
    invalidation::known_generation().map(with_roles)
}

/// The version now, with a statement when it takes one.
pub fn version(client: &mut SpiClient<'_>) -> BusResult<Version> {
    Ok(with_roles(invalidation::generation(client)?))
}

/// The version of the catalog's generation `catalog` and of the roles now.
fn with_roles(catalog: u64) -> Version {
    Version {
        catalog,
        roles: invalidation::roles_generation(),
    }
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
        held.version == Some(now) && held.has(name, (on, role, privilege))
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
    // SAFETY: a plain read of the running transaction's state.
    let subtransaction = unsafe { pg_sys::GetCurrentSubTransactionId() };
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        if held.version != Some(read_under) || held.pending.len() >= LIMIT {
            *held = Held {
                version: Some(read_under),
                ..Held::default()
            };
        }
        let answer = (on, role, privilege);
        if !held.has(name, answer) {
            held.pending
                .push((name.to_string(), answer, subtransaction));
        }
    });
}

/// The transaction's answers are kept at its commit and dropped at its abort, or when it is
/// prepared (its end comes in another session).
pub fn at_transaction_end(event: pg_sys::XactEvent::Type) {
    use pg_sys::XactEvent::*;
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        if held.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut held.pending);
        if matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT) {
            for (name, answer, _) in pending {
                if !held.kept.contains_key(&name) && held.kept.len() >= LIMIT {
                    held.kept.clear();
                }
                held.kept.entry(name).or_default().push(answer);
            }
        } else if !matches!(
            event,
            XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE
        ) {
            held.pending = pending;
        }
    });
}

/// A subtransaction that aborts drops the answers it (or one inside it) read.
pub fn at_subtransaction_end(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        HELD.with(|held| {
            held.borrow_mut()
                .pending
                .retain(|&(_, _, read_in)| read_in < subtransaction)
        });
    }
}
