//! Queue definitions, messages and de-duplication keys survive pg_dump / pg_restore into a new database,
//! and the API carries on there (ids continue, remembered dedup ids still deduplicate).

use std::process::Command;

use bussig_tests::*;
use postgres::{Client, NoTls};

/// PostgreSQL's client programs; `make test` uses the system PostgreSQL 15.
fn pg_program(name: &str) -> String {
    let bin =
        std::env::var("BUSSIG_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    format!("{bin}/{name}")
}

/// BUSSIG_TEST_URL pointed at another database (a later key wins in a libpq connection string).
fn url_for(database: &str) -> String {
    let url =
        std::env::var("BUSSIG_TEST_URL").expect("BUSSIG_TEST_URL is not set: run `make test`");
    format!("{url} dbname={database}")
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(pg_program(program))
        .args(args)
        .output()
        .expect(program);
    assert!(
        output.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Everything bussig stores, as text, in a stable order.
fn snapshot(client: &mut Client) -> Vec<String> {
    let sql = "SELECT format('%s', q) FROM bussig.queue q
               UNION ALL SELECT format('%s', m) FROM bussig.message m
               UNION ALL SELECT format('%s', d) FROM bussig.dedup d
               ORDER BY 1";
    client
        .query(sql, &[])
        .expect(sql)
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[test]
fn dump_restore_keeps_queues_messages_and_keys() {
    let mut admin = connect();
    let source = unique_name("dump_src");
    let target = unique_name("dump_dst");
    for database in [&source, &target] {
        admin
            .batch_execute(&format!("CREATE DATABASE \"{database}\""))
            .expect("create database");
    }

    let mut src = Client::connect(&url_for(&source), NoTls).expect("connect to source");
    src.batch_execute(
        r#"CREATE EXTENSION bussig;
           SELECT bussig.create_queue('orders', max_deliveries => 7, message_ttl => '1 day',
                                      dead_letter_queue => 'failed');
           SELECT bussig.create_queue('mail', retry_multiplier => 3);
           SELECT bussig.send('orders', '{"n": 1}', headers => '{"h": "v"}', delay => '1 hour',
                              priority => 4, dedup_id => 'k1', correlation_id => 'c', reply_to => 'r');
           SELECT bussig.send_batch('mail', ARRAY['{"n": 2}', '{"n": 3}']::jsonb[]);
           SELECT bussig.dead_letter('mail', message_id, lock_token, 'bad', 'oops') FROM bussig.read('mail');"#,
    )
    .expect("fill source");
    let before = snapshot(&mut src);
    let last_id: i64 = src
        .query_one("SELECT max(message_id) FROM bussig.message", &[])
        .unwrap()
        .get(0);
    drop(src);

    let dump = std::env::temp_dir().join(format!("{source}.dump"));
    let dump = dump.to_str().unwrap();
    run("pg_dump", &["-Fc", "-f", dump, "-d", &url_for(&source)]);
    run("pg_restore", &["-d", &url_for(&target), dump]);
    std::fs::remove_file(dump).ok();

    let mut dst = Client::connect(&url_for(&target), NoTls).expect("connect to target");
    assert_eq!(snapshot(&mut dst), before, "restored contents differ");

    let next_id: i64 = dst
        .query_one("SELECT bussig.send('orders', '{}')", &[])
        .unwrap()
        .get(0);
    assert!(
        next_id > last_id,
        "ids restart after restore: {next_id} <= {last_id}"
    );
    let duplicate: Option<i64> = dst
        .query_one("SELECT bussig.send('orders', '{}', dedup_id => 'k1')", &[])
        .unwrap()
        .get(0);
    assert_eq!(duplicate, None, "dedup key lost in restore");
    let redriven: i64 = dst
        .query_one("SELECT bussig.redrive('mail')", &[])
        .unwrap()
        .get(0);
    assert_eq!(redriven, 1);
    let ready: i64 = dst
        .query_one("SELECT count(*) FROM bussig.read('mail', 10)", &[])
        .unwrap()
        .get(0);
    assert_eq!(ready, 2);
    drop(dst);

    for database in [&source, &target] {
        admin
            .batch_execute(&format!("DROP DATABASE \"{database}\" WITH (FORCE)"))
            .expect("drop database");
    }
}
