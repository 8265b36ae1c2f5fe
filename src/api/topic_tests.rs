//! Unit tests of publish/subscribe, the maintenance steps and waiting reads. The test server does not
//! preload bussig, so there is no worker here: fan-outs are written by the publish itself, worker
//! steps run through run_maintenance(), and waiting reads poll.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::api::test_support::*;

    fn maintenance(step: &str) -> i64 {
        one::<i64>(&format!(
            "SELECT (bussig.run_maintenance() ->> '{step}')::bigint"
        ))
        .unwrap()
    }

    #[pg_test]
    fn subscribe_creates_the_queue_and_is_idempotent() {
        assert_eq!(
            one::<bool>("SELECT bussig.subscribe('audit', 'orders.>')"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.subscribe('audit', 'orders.>')"),
            Some(false)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.subscribe('audit', 'invoices.*')"),
            Some(true)
        );
        assert_eq!(
            count("SELECT FROM bussig.queue WHERE name IN ('audit', 'audit_dlq')"),
            2
        );
        assert_eq!(
            one::<String>("SELECT string_agg(pattern, ' ' ORDER BY pattern) FROM bussig.subscriptions WHERE queue = 'audit'")
                .as_deref(),
            Some("invoices.* orders.>")
        );
        assert_eq!(
            one::<bool>("SELECT bussig.unsubscribe('audit', 'invoices.*')"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.unsubscribe('audit', 'invoices.*')"),
            Some(false)
        );
        assert_eq!(count("SELECT FROM bussig.subscriptions"), 1);
    }

    #[pg_test]
    fn subscribe_rejects_invalid_patterns_and_creates_nothing() {
        for pattern in [
            "", "a*", "*a", "a.b>", "a.>.b", ">.a", "a..b", ".a", "a.", "a b", "ä",
        ] {
            assert_fails(
                &format!("SELECT bussig.subscribe('q', '{pattern}')"),
                "22023",
            );
        }
        assert_fails(
            &format!(
                "SELECT bussig.subscribe('q', '{}')",
                vec!["a"; 17].join(".")
            ),
            "22023",
        );
        assert_fails(
            &format!("SELECT bussig.subscribe('q', '{}')", "a".repeat(256)),
            "22023",
        );
        assert_fails("SELECT bussig.subscribe('q', NULL)", "22004");
        assert_fails("SELECT bussig.subscribe('bad name', 'a')", "22023");
        assert_fails("SELECT bussig.subscribe('q', 'a', ttl => '0')", "22023");
        assert_fails("SELECT bussig.unsubscribe('missing', 'a')", "42704");
        assert_fails("SELECT bussig.unsubscribe('q', 'a*')", "22023");
        assert_eq!(count("SELECT FROM bussig.queue"), 0);
        for pattern in [
            ">",
            "*",
            "*.*",
            "a.*.c",
            "a.>",
            "*.>",
            "Orders.EU",
            "a-b_c.d:e",
        ] {
            assert_eq!(
                one::<bool>(&format!("SELECT bussig.subscribe('q', '{pattern}')")),
                Some(true),
                "{pattern}"
            );
        }
    }

    #[pg_test]
    fn publish_delivers_once_per_matching_queue() {
        run("SELECT bussig.subscribe('all_orders', 'orders.*'), bussig.subscribe('all_orders', 'orders.>')");
        run("SELECT bussig.subscribe('eu', 'orders.eu.*')");
        run("SELECT bussig.subscribe('everything', '>')");
        run("SELECT bussig.subscribe('invoices', 'invoices.>')");
        assert_eq!(
            one::<i32>(
                r#"SELECT bussig.publish('orders.eu.created', '{"id": 1}', headers => '{"h": 1}', correlation_id => 'c')"#
            ),
            Some(3)
        );
        assert_eq!(
            one::<i32>("SELECT bussig.publish('orders.us', '2')"),
            Some(2)
        );
        assert_eq!(
            one::<i32>("SELECT bussig.publish('nobody.here', '3')"),
            Some(1)
        );
        run("SELECT bussig.unsubscribe('everything', '>')");
        assert_eq!(
            one::<i32>("SELECT bussig.publish('nobody.here', '4')"),
            Some(0)
        );
        assert_eq!(
            one::<String>(
                "SELECT string_agg(format('%s:%s', queue, ready), ' ' ORDER BY queue) FROM bussig.queues WHERE queue NOT LIKE '%dlq'"
            )
            .as_deref(),
            Some("all_orders:2 eu:1 everything:3 invoices:0")
        );
        assert_eq!(
            one::<String>(
                "SELECT format('%s %s %s %s', subject, payload, headers, correlation_id) FROM bussig.read('eu')"
            )
            .as_deref(),
            Some(r#"orders.eu.created {"id": 1} {"h": 1} c"#)
        );
        // A fan-out stores its payload once; a single delivery inline.
        assert_eq!(count("SELECT FROM bussig.body"), 2);
        assert_eq!(count("SELECT FROM bussig.message WHERE body_id IS NULL"), 1);
    }

    #[pg_test]
    fn publish_follows_subscription_changes_in_the_same_transaction() {
        run("SELECT bussig.subscribe('a', 'x.*')");
        assert_eq!(one::<i32>("SELECT bussig.publish('x.1', '1')"), Some(1));
        run("SELECT bussig.subscribe('b', 'x.1')");
        assert_eq!(one::<i32>("SELECT bussig.publish('x.1', '2')"), Some(2));
        run("SELECT bussig.drop_queue('a')");
        assert_eq!(one::<i32>("SELECT bussig.publish('x.1', '3')"), Some(1));
    }

    #[pg_test]
    fn publish_rejects_bad_input_and_delivers_nothing() {
        run("SELECT bussig.subscribe('q', '>')");
        for subject in ["", "a.*", "a.>", "a*b", "a..b", ".a", "a.", "a b", "é"] {
            assert_fails(&format!("SELECT bussig.publish('{subject}', '1')"), "22023");
        }
        assert_all_fail(&[
            ("SELECT bussig.publish(NULL, '1')", "22004"),
            ("SELECT bussig.publish('a', NULL)", "22004"),
            ("SELECT bussig.publish('a', '1', headers => '[]')", "22023"),
            ("SELECT bussig.publish('a', '1', delay => '-1 s')", "22023"),
            ("SELECT bussig.publish('a', '1', priority => NULL)", "22004"),
            (
                "SELECT bussig.publish('a', to_jsonb(repeat('x', 1048576)))",
                "54000",
            ),
        ]);
        assert_eq!(count("SELECT FROM bussig.message"), 0);
        assert_eq!(count("SELECT FROM bussig.body"), 0);
    }

    #[pg_test]
    fn publish_deduplicates_per_queue_and_honours_delay_and_priority() {
        run("SELECT bussig.subscribe('a', 'k.*')");
        assert_eq!(
            one::<i32>("SELECT bussig.publish('k.1', '1', dedup_id => 'once')"),
            Some(1)
        );
        run("SELECT bussig.subscribe('b', 'k.*')");
        // 'a' remembers the id; 'b' never saw it.
        assert_eq!(
            one::<i32>("SELECT bussig.publish('k.1', '2', dedup_id => 'once')"),
            Some(1)
        );
        assert_eq!(
            one::<i32>("SELECT bussig.publish('k.1', '3', dedup_id => 'once')"),
            Some(0)
        );
        assert_eq!(messages_in("a"), 1);
        assert_eq!(messages_in("b"), 1);
        run("SELECT bussig.publish('k.2', '4', delay => '1 hour', priority => 7, reply_to => 'r')");
        assert_eq!(
            one::<String>("SELECT format('%s %s %s', state, priority, reply_to) FROM bussig.peek('b') WHERE payload = '4'").as_deref(),
            Some("delayed 7 r")
        );
    }

    #[pg_test]
    fn publish_writes_large_fan_outs_itself_when_no_worker_runs() {
        run("SET LOCAL bussig.inline_fanout_limit = 2");
        run("SELECT bussig.subscribe('q' || n, 'wide') FROM generate_series(1, 5) n");
        assert_eq!(one::<i32>("SELECT bussig.publish('wide', '1')"), Some(5));
        assert_eq!(
            count("SELECT FROM bussig.message WHERE subject = 'wide'"),
            5
        );
        assert_eq!(count("SELECT FROM bussig.fanout"), 0);
    }

    #[pg_test]
    fn publish_batch_is_all_or_nothing() {
        run("SELECT bussig.subscribe('a', 'a.*'), bussig.subscribe('b', '*.x')");
        assert_eq!(
            one::<i64>("SELECT bussig.publish_batch(ARRAY['a.x', 'a.y', 'c.x', 'c.y'], ARRAY['1', '2', '3', '4']::jsonb[])"),
            Some(4)
        );
        assert_all_fail(&[
            (
                "SELECT bussig.publish_batch(ARRAY['a.x', 'a.*'], ARRAY['1', '2']::jsonb[])",
                "22023",
            ),
            (
                "SELECT bussig.publish_batch(ARRAY['a.x'], ARRAY['1', '2']::jsonb[])",
                "22023",
            ),
            (
                "SELECT bussig.publish_batch(ARRAY['a.x', NULL], ARRAY['1', '2']::jsonb[])",
                "22004",
            ),
            (
                "SELECT bussig.publish_batch(ARRAY['a.x', 'a.y'], ARRAY['1', NULL]::jsonb[])",
                "22004",
            ),
            (
                "SELECT bussig.publish_batch(NULL, ARRAY['1']::jsonb[])",
                "22004",
            ),
            (
                "SELECT bussig.publish_batch(ARRAY['a.x'], ARRAY['1']::jsonb[], headers => '1')",
                "22023",
            ),
        ]);
        assert_eq!(count("SELECT FROM bussig.message"), 4);
    }

    #[pg_test]
    fn match_lists_receivers_and_patterns() {
        run("SELECT bussig.subscribe('a', 'orders.*'), bussig.subscribe('a', 'orders.>'), bussig.subscribe('b', 'x')");
        assert_eq!(
            one::<String>("SELECT string_agg(queue || '=' || pattern, ' ' ORDER BY queue, pattern) FROM bussig.match('orders.eu')")
                .as_deref(),
            Some("a=orders.* a=orders.>")
        );
        assert_eq!(count("SELECT * FROM bussig.match('nothing')"), 0);
        assert_fails("SELECT * FROM bussig.match('a.*')", "22023");
    }

    #[pg_test]
    fn ephemeral_queues_live_on_heartbeats() {
        run("SELECT bussig.subscribe('cache.node1', 'cache.invalidate', ttl => '30 seconds')");
        run("SELECT bussig.subscribe('durable', 'cache.invalidate')");
        assert_eq!(
            one::<bool>(
                "SELECT expires_at > now() FROM bussig.subscriptions WHERE queue = 'cache.node1'"
            ),
            Some(true)
        );
        assert_eq!(
            one::<bool>(
                "SELECT expires_at IS NULL FROM bussig.subscriptions WHERE queue = 'durable'"
            ),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.heartbeat('cache.node1')"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.heartbeat('durable')"),
            Some(false)
        );
        assert_fails("SELECT bussig.heartbeat('missing')", "42704");
        run("SELECT bussig.publish('cache.invalidate', '1')");
        assert_eq!(maintenance("dropped_queues"), 0);
        run("UPDATE bussig.queue SET heartbeat_at = now() - interval '1 minute' WHERE name = 'cache.node1'");
        assert_eq!(maintenance("dropped_queues"), 1);
        assert_eq!(
            count("SELECT FROM bussig.queue WHERE name LIKE 'cache.node1%'"),
            0
        );
        assert_eq!(count("SELECT FROM bussig.subscriptions"), 1);
        assert_eq!(
            one::<i32>("SELECT bussig.publish('cache.invalidate', '2')"),
            Some(1)
        );
    }

    #[pg_test]
    fn notify_needs_a_short_enough_queue_name() {
        assert_eq!(
            one::<bool>("SELECT bussig.create_queue('events', notify => true)"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT notify FROM bussig.queue WHERE name = 'events'"),
            Some(true)
        );
        run("SELECT bussig.alter_queue('events', notify => false)");
        assert_eq!(
            one::<bool>("SELECT notify FROM bussig.queue WHERE name = 'events'"),
            Some(false)
        );
        assert_fails(
            &format!(
                "SELECT bussig.create_queue('{}', notify => true)",
                "n".repeat(57)
            ),
            "22023",
        );
        assert_fails("SELECT bussig.create_queue('x', notify => NULL)", "22004");
        run(&format!("SELECT bussig.create_queue('{}')", "n".repeat(56)));
        run(&format!(
            "SELECT bussig.alter_queue('{}', notify => true)",
            "n".repeat(56)
        ));
        // Sending to a notify queue works inside a transaction; the NOTIFY goes out at commit.
        assert!(one::<i64>(&format!("SELECT bussig.send('{}', '1')", "n".repeat(56))).is_some());
    }

    #[pg_test]
    fn maintenance_dead_letters_locks_that_ran_out_on_the_last_delivery() {
        run("SELECT bussig.create_queue('q', max_deliveries => 1)");
        run("SELECT bussig.send('q', '\"last\"'), bussig.send('q', '\"spare\"')");
        run("SELECT * FROM bussig.read('q')");
        assert_eq!(maintenance("dead_lettered_locks"), 0);
        let_time_pass("q");
        assert_eq!(maintenance("dead_lettered_locks"), 1);
        assert_eq!(
            one::<String>("SELECT format('%s %s', payload, headers ->> 'bussig-dead-letter-reason') FROM bussig.peek('q_dlq')")
                .as_deref(),
            Some(r#""last" max_deliveries"#)
        );
        assert_eq!(messages_in("q"), 1);
    }

    #[pg_test]
    fn maintenance_expires_messages_past_their_ttl() {
        run("SELECT bussig.create_queue('q', message_ttl => '1 hour')");
        run("SELECT bussig.send('q', '\"old\"'), bussig.send('q', '\"new\"')");
        // Sent two hours ago, and ready since.
        run("UPDATE bussig.message SET enqueued_at = now() - interval '2 hours', visible_at = now() - interval '2 hours'
             WHERE payload = '\"old\"'");
        assert_eq!(maintenance("expired_messages"), 1);
        assert_eq!(
            one::<String>("SELECT format('%s %s', payload, headers ->> 'bussig-dead-letter-reason') FROM bussig.peek('q_dlq')")
                .as_deref(),
            Some(r#""old" expired"#)
        );
        assert_eq!(messages_in("q"), 1);
    }

    #[pg_test]
    fn maintenance_prunes_keys_collects_bodies_and_removes_orphans() {
        run("SELECT bussig.create_queue('q', dedup_window => '1 minute')");
        run("SELECT bussig.send('q', '1', dedup_id => 'k1'), bussig.send('q', '2', dedup_id => 'k2')");
        run("UPDATE bussig.dedup SET expires_at = now() - interval '1 second' WHERE dedup_id = 'k1'");
        assert_eq!(maintenance("pruned_dedup_keys"), 1);
        assert_eq!(
            one::<String>("SELECT string_agg(dedup_id, ' ') FROM bussig.dedup").as_deref(),
            Some("k2")
        );

        // A body goes only once nothing has referred to it for a minute.
        run("SELECT bussig.subscribe('a', 'x'), bussig.subscribe('b', 'x')");
        run("SELECT bussig.publish('x', '\"shared\"')");
        run("INSERT INTO bussig.body (payload) VALUES ('\"unused\"')");
        let marks_age =
            "UPDATE bussig.body SET unreferenced_since = unreferenced_since - interval '2 minutes'";
        assert_eq!(maintenance("collected_bodies"), 0);
        run(marks_age);
        assert_eq!(maintenance("collected_bodies"), 1);
        run("DELETE FROM bussig.message WHERE subject = 'x'");
        assert_eq!(maintenance("collected_bodies"), 0);
        run(marks_age);
        assert_eq!(maintenance("collected_bodies"), 1);
        assert_eq!(count("SELECT FROM bussig.body"), 0);

        // A body whose messages arrive after it was marked (a restore loads bodies first) stays.
        run("INSERT INTO bussig.body (body_id, payload) VALUES (-5, '\"restored\"')");
        assert_eq!(maintenance("collected_bodies"), 0);
        run("INSERT INTO bussig.message (queue_id, visible_at, body_id)
             SELECT queue_id, now(), -5 FROM bussig.queue WHERE name = 'a'");
        run(marks_age);
        assert_eq!(maintenance("collected_bodies"), 0);
        assert_eq!(
            count("SELECT FROM bussig.body WHERE body_id = -5 AND unreferenced_since IS NULL"),
            1
        );

        // A message a send committed for a queue that was dropped meanwhile goes a minute after the
        // drop; a message whose queue is only missing (a restore loads messages first) stays.
        run("SELECT bussig.create_queue('doomed')");
        let doomed = one::<i32>("SELECT queue_id FROM bussig.queue WHERE name = 'doomed'").unwrap();
        run("SELECT bussig.drop_queue('doomed')");
        run(&format!("INSERT INTO bussig.message (queue_id, visible_at, payload) VALUES ({doomed}, now(), '1')"));
        run("INSERT INTO bussig.message (queue_id, visible_at, payload) VALUES (-1, now(), '1')");
        assert_eq!(maintenance("removed_orphans"), 0);
        run("UPDATE bussig.dropped_queue SET dropped_at = dropped_at - interval '2 minutes'");
        assert_eq!(maintenance("removed_orphans"), 1);
        assert_eq!(
            count(&format!(
                "SELECT FROM bussig.message WHERE queue_id IN ({doomed}, -1)"
            )),
            1
        );
    }

    #[pg_test]
    fn maintenance_delivers_handed_over_fan_outs_exactly_once() {
        run("SELECT bussig.create_queue('fan' || n) FROM generate_series(1, 2500) n");
        run("WITH body AS (INSERT INTO bussig.body (payload) VALUES ('\"wide\"') RETURNING body_id)
             INSERT INTO bussig.fanout (body_id, queue_ids, subject, visible_at, enqueued_at, priority)
             SELECT body_id, (SELECT array_agg(queue_id ORDER BY queue_id) FROM bussig.queue WHERE name LIKE 'fan%' AND name NOT LIKE '%dlq')
                    || ARRAY[-7], 'wide', now(), now(), 0
             FROM body");
        assert_eq!(maintenance("fanned_out"), 2500);
        assert_eq!(
            count("SELECT FROM bussig.message WHERE subject = 'wide'"),
            2500
        );
        assert_eq!(count("SELECT queue_id FROM bussig.message WHERE subject = 'wide' GROUP BY 1 HAVING count(*) > 1"), 0);
        assert_eq!(count("SELECT FROM bussig.fanout"), 0);
        assert_eq!(
            one::<String>("SELECT payload::text FROM bussig.read('fan1')").as_deref(),
            Some("\"wide\"")
        );
    }

    #[pg_test]
    fn queues_view_counts_messages_at_once_and_splits_them_by_the_workers_count() {
        run("SELECT bussig.create_queue('big'), bussig.create_queue('small')");
        run("SELECT bussig.send_batch('big', array_agg(to_jsonb(n))) FROM generate_series(1, 10000) n");
        run("SELECT bussig.send_batch('small', ARRAY['1', '2']::jsonb[])");
        assert_eq!(maintenance("counted_queues"), 2);
        let view = || {
            one::<String>(
                "SELECT string_agg(format('%s:%s/%s/%s=%s', queue, ready, delayed, locked, messages), ' '
                                   ORDER BY queue)
                 FROM bussig.queues WHERE queue IN ('big', 'small')",
            )
            .unwrap()
        };
        // Reads move messages from ready to locked: the split shows it after the next count.
        run("SELECT * FROM bussig.read('big', 5)");
        run("SELECT * FROM bussig.read('small')");
        assert_eq!(view(), "big:10000/0/0=10000 small:2/0/0=2");
        assert_eq!(maintenance("counted_queues"), 2);
        assert_eq!(view(), "big:9995/0/5=10000 small:1/0/1=2");
        // How many there are is exact at every look, and no part of the split exceeds it.
        run("SELECT bussig.purge_queue('big')");
        run("SELECT bussig.send('small', '3', delay => '1 hour')");
        assert_eq!(view(), "big:0/0/0=0 small:2/0/1=3");
    }

    #[pg_test]
    fn without_the_preload_the_worker_is_reported_missing() {
        assert_eq!(
            one::<String>("SELECT bussig.ensure_worker()").as_deref(),
            Some("not loaded")
        );
    }

    #[pg_test]
    fn read_waits_for_nothing_longer_than_asked() {
        run("SELECT bussig.create_queue('q')");
        let waited = one::<f64>(
            "WITH t AS (SELECT clock_timestamp() AS started), r AS (SELECT count(*) FROM bussig.read('q', wait => '200 ms'))
             SELECT extract(epoch FROM clock_timestamp() - started)::float8 FROM t, r",
        )
        .unwrap();
        assert!((0.19..5.0).contains(&waited), "waited {waited} s");
        run("SELECT bussig.send('q', '1')");
        assert_eq!(
            count("SELECT * FROM bussig.read('q', wait => '10 seconds')"),
            1
        );
    }
}
