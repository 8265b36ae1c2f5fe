//! #[pg_test]s of subscriptions, publish and match. The test server does not preload bussig, so there
//! is no worker here: fan-outs are written by the publish itself.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::*;

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
}
