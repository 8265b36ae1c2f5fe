//! Helpers shared by the #[pg_test] modules.
use pgrx::prelude::*;

/// The SQLSTATE a statement fails with, or None when it succeeds. An exception block around it
/// rolls back whatever the statement did, as a client's failed statement would be.
pub fn sqlstate_of(sql: &str) -> Option<String> {
    Spi::run(
        "CREATE OR REPLACE FUNCTION pg_temp.sqlstate_of(statement text) RETURNS text
         LANGUAGE plpgsql AS $$
         BEGIN EXECUTE statement; RETURN NULL;
         EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE;
         END $$",
    )
    .unwrap();
    Spi::get_one_with_args::<String>("SELECT pg_temp.sqlstate_of($1)", &[sql.into()]).unwrap()
}

pub fn assert_fails(sql: &str, sqlstate: &str) {
    assert_eq!(sqlstate_of(sql).as_deref(), Some(sqlstate), "{sql}");
}

/// Each (statement, SQLSTATE) pair fails as given.
pub fn assert_all_fail(cases: &[(&str, &str)]) {
    for (sql, sqlstate) in cases {
        assert_fails(sql, sqlstate);
    }
}

pub fn one<T: IntoDatum + FromDatum>(sql: &str) -> Option<T> {
    Spi::get_one::<T>(sql).unwrap()
}

pub fn count(sql: &str) -> i64 {
    one::<i64>(&format!("SELECT count(*) FROM ({sql}) AS rows")).unwrap()
}

pub fn run(sql: &str) {
    Spi::run(sql).unwrap()
}

pub fn messages_in(queue: &str) -> i64 {
    count(&format!(
        "SELECT FROM bussig.message m JOIN bussig.queue q USING (queue_id) WHERE q.name = '{queue}'"
    ))
}

/// Reads one message and keeps its delivery in temp table `got` for later settle calls.
pub fn read_into_got(queue: &str) {
    run("DROP TABLE IF EXISTS pg_temp.got");
    run(&format!(
        "CREATE TEMP TABLE got AS SELECT * FROM bussig.read('{queue}')"
    ));
}

/// Creates `queue` with one message in it, and reads that into `got`.
pub fn one_read_into_got(queue: &str) {
    run(&format!("SELECT bussig.create_queue('{queue}')"));
    run(&format!("SELECT bussig.send('{queue}', '1')"));
    read_into_got(queue);
}

/// Makes every lock and delay of the queue run out, as if time had passed; messages waiting behind
/// their group's head keep waiting.
pub fn let_time_pass(queue: &str) {
    // Time passes for the queue's read position too.
    if let Ok(Some(queue_id)) = Spi::get_one::<i32>(&format!(
        "SELECT queue_id FROM bussig.queue WHERE name = '{queue}'"
    )) {
        crate::message::read_position::forget(queue_id);
    }
    run(&format!(
        "UPDATE bussig.message
         SET visible_at = CASE WHEN visible_at = 'infinity' THEN visible_at ELSE now() - interval '1 second' END,
             group_ready_at = CASE WHEN group_ready_at IS NOT NULL THEN now() - interval '1 second' END,
             enqueued_at = enqueued_at - interval '1 second'
         WHERE queue_id = (SELECT queue_id FROM bussig.queue WHERE name = '{queue}')"
    ));
    run(&format!(
        "UPDATE bussig.in_flight_slot SET locked_until = least(locked_until, now() - interval '1 second')
         WHERE queue_id = (SELECT queue_id FROM bussig.queue WHERE name = '{queue}')"
    ));
}

/// Runs every maintenance step once (as the worker would) and returns what `step` did.
pub fn maintenance(step: &str) -> i64 {
    one::<i64>(&format!(
        "SELECT (bussig.run_maintenance() ->> '{step}')::bigint"
    ))
    .unwrap()
}
