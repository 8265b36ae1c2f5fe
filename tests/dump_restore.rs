//! Queue definitions, messages and de-duplication keys survive pg_dump / pg_restore into a new database,
//! and the API carries on there (ids continue, remembered dedup ids still deduplicate).

use bussig_tests::*;

/// Everything bussig stores, as text, in a stable order.
fn snapshot(client: &mut Client) -> Vec<String> {
    let sql = "SELECT format('%s', q) FROM bussig.queue q
               UNION ALL SELECT format('%s', m) FROM bussig.message m
               UNION ALL SELECT format('%s', d) FROM bussig.dedup d
               UNION ALL SELECT format('%s', g) FROM bussig.queue_grant g
               UNION ALL SELECT format('%s', c) FROM bussig.queue_creator c
               UNION ALL SELECT format('%s', s) FROM bussig.subscription s
               ORDER BY 1";
    client
        .query(sql, &[])
        .expect(sql)
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[test]
fn dump_restore_keeps_queues_messages_keys_and_grants() {
    let source = Database::create("dump_src");
    let target = Database::create("dump_dst");
    let role = Role::create("dump_role");

    let mut src = source.connect();
    src.batch_execute(&format!(
        r#"CREATE EXTENSION bussig;
           SELECT bussig.create_queue('orders', max_deliveries => 7, message_ttl => '1 day',
                                      dead_letter_queue => 'failed');
           SELECT bussig.create_queue('mail', retry_multiplier => 3);
           SELECT bussig.send('orders', '{{"n": 1}}', headers => '{{"h": "v"}}', delay => '1 hour',
                              priority => 4, dedup_id => 'k1', correlation_id => 'c', reply_to => 'r');
           SELECT bussig.send_batch('mail', ARRAY['{{"n": 2}}', '{{"n": 3}}']::jsonb[]);
           SELECT bussig.dead_letter('mail', message_id, lock_token, 'bad', 'oops') FROM bussig.read('mail');
           SELECT bussig.subscribe('mail', 'mail.>');
           SELECT bussig.grant('orders', '{role}', ARRAY['send', 'consume']);
           SELECT bussig.grant('mail', 'public', ARRAY['send']);
           SELECT bussig.grant_create_queues('{role}');"#,
        role = role.name
    ))
    .expect("fill source");
    let before = snapshot(&mut src);
    let last_id: i64 = src
        .query_one("SELECT max(message_id) FROM bussig.message", &[])
        .unwrap()
        .get(0);
    drop(src);

    let dump = std::env::temp_dir().join(format!("{}.dump", source.name));
    let dump = dump.to_str().unwrap();
    run_program(
        "pg_dump",
        &["-Fc", "-f", dump, "-d", &session_url_for(&source.name)],
    );
    run_program("pg_restore", &["-d", &session_url_for(&target.name), dump]);
    std::fs::remove_file(dump).ok();

    let mut dst = target.connect();
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
    // The grants hold in the new database: the role may send and consume on orders, create queues,
    // and nothing more.
    let may: Vec<bool> = dst
        .query_one(
            "SELECT bussig.has_queue_privilege($1::text::regrole, 'orders', 'send'),
                    bussig.has_queue_privilege($1::text::regrole, 'orders', 'manage'),
                    bussig.has_queue_privilege($1::text::regrole, 'mail', 'send'),
                    bussig.may_create_queues($1::text::regrole)",
            &[&role.name],
        )
        .map(|row| (0..4).map(|i| row.get(i)).collect())
        .unwrap();
    assert_eq!(may, [true, false, true, true]);
    let published: i32 = dst
        .query_one("SELECT bussig.publish('mail.x', '{}')", &[])
        .unwrap()
        .get(0);
    assert_eq!(published, 1, "subscription lost in restore");
}

/// A stream's definition, positions, grants, subscriptions and records, as text, in a stable order.
fn stream_snapshot(client: &mut Client) -> Vec<String> {
    // Committed records get their numbers first, so that the positions below show them.
    client
        .execute(
            "SELECT FROM generate_series(0, 1) p, bussig.stream_range('events', p, 1, 1)",
            &[],
        )
        .expect("numbering");
    let sql = "SELECT format('%s', s) FROM bussig.stream s
               UNION ALL SELECT format('%s', p) FROM bussig.stream_partition p
               UNION ALL SELECT format('%s', g) FROM bussig.stream_segment g
               UNION ALL SELECT format('%s', c) FROM bussig.consumer_group c
               UNION ALL SELECT format('%s', g) FROM bussig.group_partition g
               UNION ALL SELECT format('%s', g) FROM bussig.stream_grant g
               UNION ALL SELECT format('%s %s', stream_id, pattern) FROM bussig.stream_subscription
               UNION ALL SELECT format('%s', r) FROM generate_series(0, 1) p, bussig.stream_range('events', p, 1, 1000) r
               ORDER BY 1";
    client
        .query(sql, &[])
        .expect(sql)
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[test]
fn dump_restore_keeps_streams_records_positions_and_grants() {
    let source = Database::create("dump_stream_src");
    let target = Database::create("dump_stream_dst");
    let role = Role::create("dump_stream_role");
    let mut src = source.connect();
    src.batch_execute(&format!(
        r#"CREATE EXTENSION bussig;
           SELECT bussig.create_stream('events', 2, retention => '3 days', retention_bytes => 100000000);
           SELECT bussig.create_consumer_group('events', 'g', 'earliest');
           SELECT bussig.append_batch('events', array_agg(to_jsonb(n)), keys => array_agg('k' || n % 3),
                                      subjects => array_agg('orders.' || n), headers => '{{"h": 1}}')
           FROM generate_series(1, 10) n;
           SELECT bussig.stream_commit('events', 'g', partition, max(seq), lease_token)
           FROM bussig.stream_read('events', 'g', 4) GROUP BY partition, lease_token;
           SELECT bussig.create_consumer_group('events', 'h', 'latest');
           SELECT bussig.subscribe_stream('events', 'orders.>');
           SELECT bussig.create_stream('audit');
           SELECT bussig.subscribe_stream('audit', '>');
           SELECT bussig.publish('orders.shared', '{{"shared": true}}');
           SELECT bussig.grant('events', '{role}', ARRAY['read']);"#,
        role = role.name
    ))
    .expect("fill source");
    // One record committed and not numbered yet: numbered after the restore.
    src.execute(
        "SELECT bussig.append('events', '\"late\"', key => 'k1')",
        &[],
    )
    .unwrap();
    let before = stream_snapshot(&mut src);
    drop(src);

    let dump = std::env::temp_dir().join(format!("{}.dump", source.name));
    let dump = dump.to_str().unwrap();
    run_program(
        "pg_dump",
        &["-Fc", "-f", dump, "-d", &session_url_for(&source.name)],
    );
    run_program("pg_restore", &["-d", &session_url_for(&target.name), dump]);
    std::fs::remove_file(dump).ok();

    let mut dst = target.connect();
    assert_eq!(stream_snapshot(&mut dst), before, "restored stream differs");
    // The group reads on from its position; numbers go on from the heads.
    let left: i64 = dst
        .query_one(
            "SELECT count(*) FROM bussig.stream_read('events', 'g', 100)",
            &[],
        )
        .unwrap()
        .get(0);
    let lag: i64 = dst
        .query_one(
            "SELECT sum(lag)::bigint FROM bussig.consumer_groups WHERE consumer_group = 'g'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, lag);
    let published: i32 = dst
        .query_one("SELECT bussig.publish('orders.x', '{}')", &[])
        .unwrap()
        .get(0);
    assert_eq!(published, 2, "stream subscriptions lost in restore");
    // Both publishes reached two streams, and stored their payloads once.
    let shared: Vec<String> = dst
        .query(
            "SELECT payload::text FROM bussig.stream_range('audit', 0, 1) ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(shared, [r#"{"shared": true}"#, "{}"]);
    let bodies: i64 = dst
        .query_one("SELECT count(*) FROM bussig.stream_body", &[])
        .unwrap()
        .get(0);
    assert_eq!(bodies, 2, "shared bodies lost in restore");
    let records: i64 = dst
        .query_one(
            "SELECT count(*) FROM generate_series(0, 1) p, bussig.stream_range('events', p, 1, 1000)",
            &[],
        )
        .unwrap()
        .get(0);
    let heads: i64 = dst
        .query_one(
            "SELECT sum(head_seq)::bigint FROM bussig.consumer_groups WHERE consumer_group = 'h'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!((heads, records), (13, 13));
    let may: bool = dst
        .query_one(
            "SELECT bussig.has_stream_privilege($1::text::regrole, 'events', 'read')
                    AND NOT bussig.has_stream_privilege($1::text::regrole, 'events', 'append')",
            &[&role.name],
        )
        .unwrap()
        .get(0);
    assert!(may, "stream grants lost in restore");
    // pg_restore makes the streams' tables without their dependency on the extension; maintenance
    // (the worker's round) records it, so DROP EXTENSION refuses again while streams exist.
    let adopted: i64 = dst
        .query_one(
            "SELECT (bussig.run_maintenance() ->> 'adopted_stream_tables')::bigint",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(adopted <= 2, "{adopted} tables adopted for 2 streams");
    let refused = dst.batch_execute("DROP EXTENSION bussig").unwrap_err();
    assert_eq!(refused.code().map(|code| code.code()), Some("2BP01"));
    let again: i64 = dst
        .query_one(
            "SELECT (bussig.run_maintenance() ->> 'adopted_stream_tables')::bigint",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(again, 0, "adopted twice");
}
