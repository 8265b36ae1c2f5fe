//! Tests that change the whole server, so `make test` runs them alone: the launcher and the workers
//! reload their settings on SIGHUP, and a worker step that fails does not stop the others.

use std::time::Duration;

use bussig_tests::*;

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

fn worker_pid(client: &mut Client) -> Option<i32> {
    client
        .query_opt(
            "SELECT pid FROM pg_stat_activity
             WHERE backend_type = 'bussig worker' AND datname = current_database()",
            &[],
        )
        .expect("worker pid")
        .map(|row| row.get(0))
}

/// Puts bussig.fanout back even when the test fails.
struct RestoreFanouts;

impl Drop for RestoreFanouts {
    fn drop(&mut self) {
        let _ = connect().batch_execute("ALTER TABLE bussig.fanout_hidden RENAME TO fanout");
    }
}

#[test]
fn a_failing_step_does_not_stop_the_others() {
    let mut client = connect();
    let wait = Duration::from_secs(30);
    let pid = eventually(wait, "a worker for this database", || {
        worker_pid(&mut client)
    });

    // Fan-out and body collection fail every round while their table is missing; expiry must go on.
    client
        .batch_execute("ALTER TABLE bussig.fanout RENAME TO fanout_hidden")
        .expect("hide fan-outs");
    let restore = RestoreFanouts;
    let queue = Queue::create(&mut client, "failing_step", "message_ttl => '1 second'");
    send(&mut client, &queue.name, &json!({ "expires": true }));
    let dead_letter_queue = queue.dlq();
    eventually(wait, "the expired message in the dead-letter queue", || {
        let dead: i64 = client
            .query_one(
                "SELECT count(*) FROM bussig.peek($1)",
                &[&dead_letter_queue],
            )
            .expect("peek")
            .get(0);
        (dead == 1).then_some(())
    });
    assert_eq!(
        worker_pid(&mut client),
        Some(pid),
        "the worker restarted instead of carrying on"
    );
    drop(restore);
}
