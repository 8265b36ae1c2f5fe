//! Bad calls fail with the documented SQLSTATE, as a client sees it.

use bussig_tests::*;

/// Runs `sql` and asserts that it fails with `expected`.
fn assert_fails(c: &mut Client, expected: &SqlState, sql: &str, params: &[&dyn Param]) {
    match c.query(sql, params) {
        Ok(rows) => panic!(
            "{sql} succeeded ({} rows), expected {}",
            rows.len(),
            expected.code()
        ),
        Err(e) => assert_eq!(e.code(), Some(expected), "{sql}: {e}"),
    }
}

#[test]
fn error_paths() {
    let mut client = connect();
    let queue = Queue::create(&mut client, "error_paths", "");
    let q = queue.name.as_str();
    let missing = unique_name("missing");

    // Unknown queue.
    let c = &mut client;
    assert_fails(
        c,
        &SqlState::UNDEFINED_OBJECT,
        "SELECT bussig.send($1::text, '{}')",
        &[&missing],
    );
    assert_fails(
        c,
        &SqlState::UNDEFINED_OBJECT,
        "SELECT * FROM bussig.read($1::text)",
        &[&missing],
    );

    // Invalid names and arguments.
    let bad = &SqlState::INVALID_PARAMETER_VALUE;
    assert_fails(c, bad, "SELECT bussig.create_queue('bad name')", &[]);
    assert_fails(c, bad, "SELECT bussig.create_queue('')", &[]);
    assert_fails(
        c,
        bad,
        "SELECT bussig.create_queue($1::text)",
        &[&"a".repeat(61)],
    );
    assert_fails(
        c,
        bad,
        "SELECT * FROM bussig.read($1::text, max_messages => 0)",
        &[&q],
    );

    // Creating an existing queue is not an error: it reports false.
    let created: bool = c
        .query_one("SELECT bussig.create_queue($1::text)", &[&q])
        .unwrap()
        .get(0);
    assert!(!created, "create_queue of an existing queue returned true");
}

/// The `bussig.` prefix is reserved: a misspelt setting is refused instead of set and never read, and
/// run_maintenance leaves the caller's jit setting as it found it.
#[test]
fn misspelt_settings_are_refused_and_maintenance_leaves_settings_alone() {
    let mut c = connect();
    assert_fails(
        &mut c,
        &SqlState::INVALID_NAME,
        "SET bussig.max_mesage_size = 1000",
        &[],
    );
    c.batch_execute("SET bussig.max_message_size = 4096; RESET bussig.max_message_size")
        .unwrap();
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SET LOCAL jit = on").unwrap();
    tx.query_one("SELECT bussig.run_maintenance()", &[])
        .unwrap();
    let jit: String = tx.query_one("SHOW jit", &[]).unwrap().get(0);
    assert_eq!(jit, "on", "jit after run_maintenance");
}
