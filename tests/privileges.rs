//! A restricted role's privilege check: planned into bussig's kept statement once (a function call
//! planned the check anew on every call, and a restricted role sent at a fifth of a superuser's rate),
//! and still answering from the grants as they are at each call.
use bussig_tests::*;

/// The statements of src/access.rs and src/stream/mod.rs, as bussig keeps them.
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

/// A restricted role's sends read bussig's catalog tables by their indexes only, however many queues
/// there are and whatever the statistics say: no sequential scan, a handful of index rows per send.
#[test]
fn a_granted_send_reads_the_catalog_by_its_indexes() {
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
    tx.batch_execute(&format!("SET LOCAL ROLE \"{}\"", role.name))
        .unwrap();
    for _ in 0..SENDS {
        tx.execute("SELECT bussig.send($1::text, '1')", &[&queue.name])
            .unwrap();
    }
    // This transaction's own counts, before it ends.
    let rows = tx
        .query(
            "SELECT relname::text, seq_scan, coalesce(idx_tup_fetch, 0)
             FROM pg_stat_xact_user_tables
             WHERE schemaname = 'bussig' AND relname IN ('queue', 'queue_grant')",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 2, "counts of bussig.queue and queue_grant");
    for row in rows {
        let (table, seq_scans, fetched): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(seq_scans, 0, "bussig.{table} scanned whole");
        assert!(
            fetched <= 4 * SENDS,
            "bussig.{table}: {fetched} index rows for {SENDS} sends"
        );
    }
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
    let mut admin = connect();
    let queue = Queue::create(&mut admin, "privilege_calls", "");
    let role = Role::create("privilege_calls");
    let team = Role::create("privilege_team");
    // The role is set per transaction: under a pooler a session's SET ROLE would reach other tests.
    let mut app = connect();
    let mut send_as_role = || {
        let mut tx = app.transaction().unwrap();
        tx.batch_execute(&format!("SET LOCAL ROLE \"{}\"", role.name))
            .unwrap();
        let refused = sqlstate(tx.execute("SELECT bussig.send($1::text, '1')", &[&queue.name]));
        if refused.is_none() {
            tx.commit().unwrap();
        }
        refused
    };
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
