//! A restricted role's privilege check: planned into bussig's kept statement once (a function call
//! planned the check anew on every call, and a restricted role sent at a fifth of a superuser's rate),
//! and still answering from the grants as they are at each call.
use std::sync::{Mutex, MutexGuard};

use bussig_tests::*;

/// The tests of this file one at a time: each creates roles or changes grants, which makes every
/// backend drop the privileges it keeps, and one test counts what a backend reads when it keeps them.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The statements of src/access/mod.rs and src/stream/mod.rs, as bussig keeps them.
const CHECKS: [(&str, &str); 2] = [
    (
        "queue",
        "SELECT held FROM bussig.queue_privilege_of($1, $2, $3) AS held",
    ),
    (
        "stream",
        "SELECT held FROM bussig.stream_privilege_of($1, $2, $3) AS held",
    ),
];

/// A function that is STRICT, VOLATILE, SECURITY DEFINER or has a SET clause is not planned into its
/// caller: the plan would show a function scan, and every call would plan the body again.
#[test]
fn the_check_is_planned_into_the_statement() {
    let _serial = serial();
    let mut admin = connect();
    let mut tx = admin.transaction().unwrap();
    // A generic plan, as bussig's kept statements run.
    tx.batch_execute("SET LOCAL plan_cache_mode = force_generic_plan")
        .unwrap();
    for (kind, check) in CHECKS {
        tx.batch_execute(&format!(
            "PREPARE privilege_check (oid, text, text) AS {check}"
        ))
        .unwrap();
        let plan: Vec<String> = tx
            .query(
                "EXPLAIN (COSTS OFF) EXECUTE privilege_check (10, 'x', NULL)",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(
            !plan.contains("Function Scan"),
            "the {kind} check is called, not planned in:\n{plan}"
        );
        assert!(
            plan.contains(&format!("on {kind} ")),
            "the {kind} check does not read bussig.{kind}:\n{plan}"
        );
        tx.batch_execute("DEALLOCATE privilege_check").unwrap();
    }
}

/// The checks read bussig's closed tables: only bussig's own statements (and the public
/// `has_*_privilege`, as the extension owner) call them.
#[test]
fn the_checks_are_not_for_everyone() {
    let _serial = serial();
    let role = Role::create("privilege_of");
    let mut admin = connect();
    for (kind, _) in CHECKS {
        let mut as_role = admin.transaction().unwrap();
        as_role
            .batch_execute(&format!("SET LOCAL ROLE \"{}\"", role.name))
            .unwrap();
        let refused = as_role.query(
            &format!("SELECT * FROM bussig.{kind}_privilege_of(10, 'x', NULL)"),
            &[],
        );
        assert_eq!(
            refused
                .err()
                .and_then(|e| e.code().map(|c| c.code().to_string())),
            Some("42501".into()),
            "{kind}_privilege_of ran for a role"
        );
    }
}

/// A restricted role's backend keeps what it found it holds: of 20 sends in one transaction, the
/// first reads bussig.queue and queue_grant (by index, never a whole table) and the other 19 read
/// neither: they take the direct path a superuser's sends take. A superuser's send comes first, in
/// the same transaction: behind a pooler the transaction may run on a backend that never ran bussig,
/// whose first call loads what every backend keeps (its queues, routes) by reading whole tables.
#[test]
fn a_granted_role_checks_the_catalog_once() {
    let _serial = serial();
    let mut admin = connect();
    let queue = Queue::create(&mut admin, "privilege_rows", "");
    let role = Role::create("privilege_rows");
    admin
        .execute(
            "SELECT bussig.grant($1::text, $2::text, ARRAY['send'])",
            &[&queue.name, &role.name],
        )
        .unwrap();
    const SENDS: i64 = 20;
    let mut tx = admin.transaction().unwrap();
    // This transaction's own counts of index scans, rows fetched and whole-table scans.
    let catalog_reads = |tx: &mut Transaction<'_>| -> Vec<(String, i64, i64, i64)> {
        tx.batch_execute("SET LOCAL ROLE NONE").unwrap();
        let rows = tx
            .query(
                "SELECT relname::text, coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0), seq_scan
                 FROM pg_stat_xact_user_tables
                 WHERE schemaname = 'bussig' AND relname IN ('queue', 'queue_grant')
                 ORDER BY relname",
                &[],
            )
            .unwrap();
        tx.batch_execute(&format!("SET LOCAL ROLE \"{}\"", role.name))
            .unwrap();
        rows.iter()
            .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
            .collect()
    };
    tx.execute(SEND, &[&queue.name]).unwrap();
    let warmed = catalog_reads(&mut tx);
    tx.execute(SEND, &[&queue.name]).unwrap();
    let after_first = catalog_reads(&mut tx);
    assert_eq!(
        after_first.len(),
        2,
        "counts of bussig.queue and queue_grant"
    );
    for ((table, scans, _, seq_scans), (_, scans_before, _, seq_scans_before)) in
        after_first.iter().zip(&warmed)
    {
        assert_eq!(seq_scans, seq_scans_before, "bussig.{table} scanned whole");
        assert!(
            scans > scans_before,
            "the first send did not check bussig.{table}"
        );
    }
    for _ in 1..SENDS {
        tx.execute(SEND, &[&queue.name]).unwrap();
    }
    assert_eq!(
        catalog_reads(&mut tx),
        after_first,
        "the later sends read the catalog again"
    );
    // The direct sends wrote their messages as the first did.
    tx.batch_execute("SET LOCAL ROLE NONE").unwrap();
    let sent: i64 = tx
        .query_one(
            "SELECT count(*) FROM bussig.message JOIN bussig.queue USING (queue_id) WHERE name = $1",
            &[&queue.name],
        )
        .unwrap()
        .get(0);
    assert_eq!(sent, 1 + SENDS, "messages sent");
    tx.rollback().unwrap();
}

fn sqlstate(result: Result<u64, postgres::Error>) -> Option<String> {
    result
        .err()
        .and_then(|error| error.code().map(|code| code.code().to_string()))
}

/// One connection sends as the role, and keeps its statements; grants, revokes and role memberships
/// committed meanwhile take effect on its next call.
#[test]
fn each_call_checks_the_grants_as_they_are() {
    let _serial = serial();
    let mut admin = connect();
    let queue = Queue::create(&mut admin, "privilege_calls", "");
    let role = Role::create("privilege_calls");
    let team = Role::create("privilege_team");
    // The role is set per transaction: under a pooler a session's SET ROLE would reach other tests.
    let mut app = connect();
    let mut send_as_role = || as_role(&mut app, &role.name, SEND, &queue.name);
    let admin_runs = |admin: &mut Client, sql: &str, role: &str| {
        admin.execute(sql, &[&queue.name, &role]).unwrap();
    };

    assert_eq!(send_as_role(), Some("42501".into()), "sent without a grant");
    admin_runs(
        &mut admin,
        "SELECT bussig.grant($1::text, $2::text, ARRAY['send'])",
        &role.name,
    );
    for _ in 0..3 {
        assert_eq!(send_as_role(), None, "refused after the grant");
    }
    admin_runs(
        &mut admin,
        "SELECT bussig.revoke($1::text, $2::text)",
        &role.name,
    );
    assert_eq!(
        send_as_role(),
        Some("42501".into()),
        "sent after the revoke"
    );

    // Through a role it is a member of.
    admin_runs(
        &mut admin,
        "SELECT bussig.grant($1::text, $2::text, ARRAY['send'])",
        &team.name,
    );
    assert_eq!(send_as_role(), Some("42501".into()), "sent as a non-member");
    admin
        .batch_execute(&format!("GRANT \"{}\" TO \"{}\"", team.name, role.name))
        .unwrap();
    assert_eq!(send_as_role(), None, "refused to a member");
    admin
        .batch_execute(&format!("REVOKE \"{}\" FROM \"{}\"", team.name, role.name))
        .unwrap();
    assert_eq!(
        send_as_role(),
        Some("42501".into()),
        "sent after the membership ended"
    );

    // Four sends went through, and no refused one left a message behind.
    assert_eq!(counts(&mut admin, &queue.name).0, 4);
    admin_runs(
        &mut admin,
        "SELECT bussig.revoke($1::text, $2::text)",
        &team.name,
    );
}

/// Runs `sql` (with `name` as $1) as `role` in a transaction of its own, committed when it succeeds:
/// the SQLSTATE when refused.
fn as_role(client: &mut Client, role: &str, sql: &str, name: &str) -> Option<String> {
    let mut tx = client.transaction().unwrap();
    tx.batch_execute(&format!("SET LOCAL ROLE \"{role}\""))
        .unwrap();
    let refused = sqlstate(tx.execute(sql, &[&name]));
    if refused.is_none() {
        tx.commit().unwrap();
    }
    refused
}

const SEND: &str = "SELECT bussig.send($1::text, '1')";
const APPEND: &str = "SELECT bussig.append($1::text, '1')";

/// What a backend keeps of a role's privileges (src/access/held.rs) goes when what it was read from
/// changes: the grantee role renamed (grants name their roles), the queue dropped and made again, a
/// grant taken back by a rollback in the very backend that kept it, a stream's grant revoked.
#[test]
fn a_kept_privilege_goes_with_what_it_was_read_from() {
    let _serial = serial();
    let mut admin = connect();
    let queue = Queue::create(&mut admin, "privilege_kept", "");
    let other = Queue::create(&mut admin, "privilege_kept_other", "");
    let role = Role::create("privilege_kept");
    let team = Role::create("privilege_kept_team");
    let mut app = connect();
    let grant = "SELECT bussig.grant($1::text, $2::text, ARRAY[$3::text])";
    admin
        .execute(grant, &[&queue.name, &team.name, &"send"])
        .unwrap();
    admin
        .batch_execute(&format!("GRANT \"{}\" TO \"{}\"", team.name, role.name))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(as_role(&mut app, &role.name, SEND, &queue.name), None);
    }

    // The grant names the team by its old name.
    let renamed = format!("{}_renamed", team.name);
    admin
        .batch_execute(&format!(
            "ALTER ROLE \"{}\" RENAME TO \"{renamed}\"",
            team.name
        ))
        .unwrap();
    let refused = as_role(&mut app, &role.name, SEND, &queue.name);
    admin
        .batch_execute(&format!(
            "ALTER ROLE \"{renamed}\" RENAME TO \"{}\"",
            team.name
        ))
        .unwrap();
    assert_eq!(
        refused,
        Some("42501".into()),
        "sent through a renamed grantee"
    );
    assert_eq!(as_role(&mut app, &role.name, SEND, &queue.name), None);

    // A queue of the same name, made anew, carries none of the old one's grants.
    admin
        .execute("SELECT bussig.drop_queue($1::text)", &[&queue.name])
        .unwrap();
    admin
        .execute("SELECT bussig.create_queue($1::text)", &[&queue.name])
        .unwrap();
    assert_eq!(
        as_role(&mut app, &role.name, SEND, &queue.name),
        Some("42501".into()),
        "sent to a queue made again"
    );

    // Granted, kept and rolled back in one backend.
    let mut tx = admin.transaction().unwrap();
    tx.execute(grant, &[&other.name, &role.name, &"send"])
        .unwrap();
    tx.batch_execute(&format!("SET LOCAL ROLE \"{}\"", role.name))
        .unwrap();
    for _ in 0..2 {
        tx.execute(SEND, &[&other.name]).unwrap();
    }
    tx.rollback().unwrap();
    assert_eq!(
        as_role(&mut admin, &role.name, SEND, &other.name),
        Some("42501".into()),
        "sent on a grant that was rolled back"
    );
    assert_eq!(counts(&mut admin, &other.name).0, 0);

    // A grant to everyone, and its revoke.
    admin
        .execute(grant, &[&other.name, &"public", &"send"])
        .unwrap();
    for _ in 0..2 {
        assert_eq!(as_role(&mut app, &role.name, SEND, &other.name), None);
    }
    admin
        .execute("SELECT bussig.revoke($1::text, 'public')", &[&other.name])
        .unwrap();
    assert_eq!(
        as_role(&mut app, &role.name, SEND, &other.name),
        Some("42501".into()),
        "sent after the grant to public was revoked"
    );

    // Streams keep theirs the same way.
    let stream = unique_name("privilege_kept");
    admin
        .execute("SELECT bussig.create_stream($1::text)", &[&stream])
        .unwrap();
    admin
        .execute(grant, &[&stream, &role.name, &"append"])
        .unwrap();
    for _ in 0..3 {
        assert_eq!(as_role(&mut app, &role.name, APPEND, &stream), None);
    }
    admin
        .execute(
            "SELECT bussig.revoke($1::text, $2::text)",
            &[&stream, &role.name],
        )
        .unwrap();
    let refused = as_role(&mut app, &role.name, APPEND, &stream);
    admin
        .execute("SELECT bussig.drop_stream($1::text)", &[&stream])
        .unwrap();
    assert_eq!(refused, Some("42501".into()), "appended after the revoke");
    admin
        .batch_execute(&format!("REVOKE \"{}\" FROM \"{}\"", team.name, role.name))
        .unwrap();
}

/// What a role's transaction found it holds counts for its backend only once that transaction
/// commits: a queue or stream it created and rolled back (wholly, or to a savepoint) left no
/// privilege behind for the one another role creates under the same name next.
#[test]
fn a_privilege_read_in_a_rolled_back_transaction_is_not_kept() {
    let _serial = serial();
    let mut admin = connect();
    let role = Role::create("privilege_rolled_back");
    admin
        .execute("SELECT bussig.grant_create_queues($1::text)", &[&role.name])
        .unwrap();
    let mut app = connect();
    let (queue, stream) = (unique_name("held_queue"), unique_name("held_stream"));
    for (create, write, name) in [
        ("SELECT bussig.create_queue($1::text)", SEND, &queue),
        ("SELECT bussig.create_stream($1::text)", APPEND, &stream),
    ] {
        let mut tx = app.transaction().unwrap();
        tx.batch_execute(&format!("SET LOCAL ROLE \"{}\"", role.name))
            .unwrap();
        tx.execute(create, &[name]).unwrap();
        for _ in 0..2 {
            tx.execute(write, &[name]).unwrap();
        }
        tx.rollback().unwrap();
        admin.execute(create, &[name]).unwrap();
        assert_eq!(
            as_role(&mut app, &role.name, write, name),
            Some("42501".into()),
            "wrote to the {name} another role created after a rollback"
        );
    }

    // Rolled back to a savepoint, and created by the admin while the role's transaction goes on.
    let again = unique_name("held_savepoint");
    let mut tx = app.transaction().unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL ROLE \"{}\"; SAVEPOINT before_create",
        role.name
    ))
    .unwrap();
    tx.execute("SELECT bussig.create_queue($1::text)", &[&again])
        .unwrap();
    tx.execute(SEND, &[&again]).unwrap();
    tx.batch_execute("ROLLBACK TO SAVEPOINT before_create")
        .unwrap();
    admin
        .execute("SELECT bussig.create_queue($1::text)", &[&again])
        .unwrap();
    assert_eq!(
        sqlstate(tx.execute(SEND, &[&again])),
        Some("42501".into()),
        "sent to the queue another role created after a rollback to a savepoint"
    );
    drop(tx);

    admin
        .execute(
            "SELECT bussig.revoke_create_queues($1::text)",
            &[&role.name],
        )
        .unwrap();
    for name in [&queue, &again] {
        assert_eq!(counts(&mut admin, name).0, 0, "{name} got a message");
        admin
            .execute("SELECT bussig.drop_queue($1::text)", &[name])
            .unwrap();
    }
    admin
        .execute("SELECT bussig.drop_stream($1::text)", &[&stream])
        .unwrap();
}
