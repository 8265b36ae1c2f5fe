//! The launcher and the workers reload their settings on SIGHUP: taking this database off
//! `bussig.worker_databases` stops its worker, putting it back starts one again. Changes the
//! server's configuration, so `make test` runs it alone.

use std::time::Duration;

use bussig_tests::*;
use postgres::Client;

fn workers_here(client: &mut Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE backend_type = 'bussig worker' AND datname = current_database()",
            &[],
        )
        .expect("count workers")
        .get(0)
}

fn reload_with(client: &mut Client, setting: &str) {
    client.batch_execute(setting).expect("alter system");
    client
        .batch_execute("SELECT pg_reload_conf()")
        .expect("reload");
}

/// Puts the server's configuration back even when the test fails.
struct ResetOnDrop;

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        reload_with(&mut connect(), "ALTER SYSTEM RESET bussig.worker_databases");
    }
}

#[test]
fn workers_follow_a_reloaded_worker_databases_setting() {
    let mut client = connect();
    let wait = Duration::from_secs(30);
    eventually(wait, "a worker for this database", || {
        (workers_here(&mut client) == 1).then_some(())
    });

    let reset = ResetOnDrop;
    reload_with(
        &mut client,
        "ALTER SYSTEM SET bussig.worker_databases = 'some_other_database'",
    );
    eventually(
        wait,
        "the worker to leave a database it no longer serves",
        || (workers_here(&mut client) == 0).then_some(()),
    );

    drop(reset);
    eventually(wait, "a worker again after the reset", || {
        (workers_here(&mut client) == 1).then_some(())
    });
}
