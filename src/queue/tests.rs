//! #[pg_test]s of creating, changing, dropping and purging queues, and of the bussig.queues view.
//! Each runs inside one transaction, rolled back afterwards, so time does not pass within a test: lock
//! expiry and TTL are simulated by moving timestamps back.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::*;

    #[pg_test]
    fn create_queue_makes_queue_and_dead_letter_queue() {
        assert_eq!(
            one::<bool>("SELECT bussig.create_queue('orders')"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.create_queue('orders', max_deliveries => 9)"),
            Some(false)
        );
        assert_eq!(
            one::<i32>("SELECT max_deliveries FROM bussig.queues WHERE queue = 'orders'"),
            Some(5)
        );
        assert_eq!(
            one::<String>("SELECT dead_letter_queue FROM bussig.queues WHERE queue = 'orders'")
                .as_deref(),
            Some("orders_dlq")
        );
        assert_eq!(
            one::<String>("SELECT dead_letter_queue FROM bussig.queues WHERE queue = 'orders_dlq'"),
            None
        );
        // The dead-letter queue made for it has the same defaults create_queue documents.
        assert_eq!(
            count(
                "SELECT max_deliveries, lock_timeout, message_ttl, retry_delay, retry_delay_max, retry_multiplier,
                        dedup_window FROM bussig.queue WHERE name IN ('orders', 'orders_dlq')
                 GROUP BY 1, 2, 3, 4, 5, 6, 7"
            ),
            1
        );
    }

    #[pg_test]
    fn create_queue_with_settings_and_shared_dead_letter_queue() {
        run(
            "SELECT bussig.create_queue('a', max_deliveries => 3, lock_timeout => '1 minute',
             message_ttl => '1 hour', retry_delay => '2 seconds', retry_delay_max => '1 minute',
             retry_multiplier => 3, dedup_window => '0', dead_letter_queue => 'shared.dlq')",
        );
        run("SELECT bussig.create_queue('b', dead_letter_queue => 'shared.dlq')");
        assert_eq!(
            count("SELECT FROM bussig.queues WHERE dead_letter_queue = 'shared.dlq' AND queue IN ('a', 'b')"),
            2
        );
        assert_eq!(
            count("SELECT FROM bussig.queue WHERE name LIKE '%\\_dlq'"),
            0
        );
        assert_eq!(
            one::<String>(
                "SELECT format('%s %s %s %s %s %s %s', max_deliveries, lock_timeout, message_ttl, retry_delay,
                               retry_delay_max, retry_multiplier, dedup_window)
                 FROM bussig.queue WHERE name = 'a'"
            )
            .as_deref(),
            Some("3 00:01:00 01:00:00 00:00:02 00:01:00 3 00:00:00")
        );
    }

    #[pg_test]
    fn create_queue_rejects_bad_input_and_creates_nothing() {
        assert_all_fail(&[
            ("SELECT bussig.create_queue('bad name')", "22023"),
            ("SELECT bussig.create_queue('')", "22023"),
            ("SELECT bussig.create_queue('_x')", "22023"),
            (
                "SELECT bussig.create_queue('x''; DROP TABLE bussig.queue; --')",
                "22023",
            ),
            ("SELECT bussig.create_queue(repeat('q', 61))", "22023"),
            // 57 characters plus '_dlq' would be an unusable dead-letter queue name.
            ("SELECT bussig.create_queue(repeat('q', 57))", "22023"),
            ("SELECT bussig.create_queue(NULL)", "22004"),
            (
                "SELECT bussig.create_queue('x', max_deliveries => 0)",
                "22023",
            ),
            (
                "SELECT bussig.create_queue('x', max_deliveries => NULL)",
                "22004",
            ),
            (
                "SELECT bussig.create_queue('x', lock_timeout => '0')",
                "22023",
            ),
            (
                "SELECT bussig.create_queue('x', lock_timeout => '-1 s')",
                "22023",
            ),
            (
                "SELECT bussig.create_queue('x', message_ttl => '-1 s')",
                "22023",
            ),
            (
                "SELECT bussig.create_queue('x', retry_delay => '-1 s')",
                "22023",
            ),
            (
                "SELECT bussig.create_queue('x', retry_delay => '1 hour')",
                "22023",
            ),
            (
                "SELECT bussig.create_queue('x', retry_multiplier => 0.5)",
                "22023",
            ),
            (
                "SELECT bussig.create_queue('x', retry_multiplier => 'NaN')",
                "22023",
            ),
            (
                "SELECT bussig.create_queue('x', retry_multiplier => 'Infinity')",
                "22023",
            ),
            (
                "SELECT bussig.create_queue('x', dedup_window => '-1 s')",
                "22023",
            ),
            (
                "SELECT bussig.create_queue('x', dead_letter_queue => 'x')",
                "22023",
            ),
            (
                "SELECT bussig.create_queue('x', dead_letter_queue => 'bad name')",
                "22023",
            ),
        ]);
        assert_eq!(count("SELECT FROM bussig.queue"), 0);
        // 56 characters leave room for '_dlq'.
        assert_eq!(
            one::<bool>("SELECT bussig.create_queue(repeat('q', 56))"),
            Some(true)
        );
    }

    #[pg_test]
    fn queue_names_are_case_sensitive() {
        run("SELECT bussig.create_queue('Orders')");
        assert_eq!(
            one::<bool>("SELECT bussig.create_queue('orders')"),
            Some(true)
        );
        run("SELECT bussig.send('Orders', '1')");
        assert_eq!(messages_in("Orders"), 1);
        assert_eq!(messages_in("orders"), 0);
    }

    #[pg_test]
    fn alter_queue_changes_only_what_it_names() {
        run("SELECT bussig.create_queue('q', max_deliveries => 3, message_ttl => '1 hour')");
        run("SELECT bussig.alter_queue('q', lock_timeout => '5 minutes')");
        assert_eq!(
            one::<String>("SELECT format('%s %s %s', max_deliveries, lock_timeout, message_ttl) FROM bussig.queues WHERE queue = 'q'")
                .as_deref(),
            Some("3 00:05:00 01:00:00")
        );
        run("SELECT bussig.alter_queue('q', message_ttl => '0')");
        assert_eq!(
            one::<bool>("SELECT message_ttl IS NULL FROM bussig.queues WHERE queue = 'q'"),
            Some(true)
        );
        run("SELECT bussig.alter_queue('q', dead_letter_queue => 'elsewhere')");
        assert_eq!(
            one::<String>("SELECT dead_letter_queue FROM bussig.queues WHERE queue = 'q'")
                .as_deref(),
            Some("elsewhere")
        );
        // The old dead-letter queue stays: it may hold messages.
        assert_eq!(count("SELECT FROM bussig.queue WHERE name = 'q_dlq'"), 1);
    }

    #[pg_test]
    fn alter_queue_rejects_bad_input_and_changes_nothing() {
        run("SELECT bussig.create_queue('q', retry_delay => '1 second')");
        assert_all_fail(&[
            (
                "SELECT bussig.alter_queue('missing', max_deliveries => 2)",
                "42704",
            ),
            ("SELECT bussig.alter_queue('bad name')", "22023"),
            ("SELECT bussig.alter_queue(NULL)", "22004"),
            (
                "SELECT bussig.alter_queue('q', max_deliveries => 0)",
                "22023",
            ),
            (
                "SELECT bussig.alter_queue('q', retry_delay_max => '10 ms')",
                "22023",
            ),
            (
                "SELECT bussig.alter_queue('q', lock_timeout => '0')",
                "22023",
            ),
            (
                "SELECT bussig.alter_queue('q', max_deliveries => 7, dead_letter_queue => 'q')",
                "22023",
            ),
        ]);
        assert_eq!(
            one::<String>("SELECT format('%s %s %s', max_deliveries, lock_timeout, dead_letter_queue) FROM bussig.queues WHERE queue = 'q'")
                .as_deref(),
            Some("5 00:00:30 q_dlq")
        );
    }

    #[pg_test]
    fn drop_queue_takes_messages_keys_and_own_dead_letter_queue() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.send('q', '1', dedup_id => 'k')");
        run("SELECT bussig.create_queue('other', dead_letter_queue => 'shared')");
        run("SELECT bussig.create_queue('third', dead_letter_queue => 'shared')");
        assert_eq!(one::<bool>("SELECT bussig.drop_queue('q')"), Some(true));
        assert_eq!(one::<bool>("SELECT bussig.drop_queue('q')"), Some(false));
        assert_eq!(
            count("SELECT FROM bussig.queue WHERE name IN ('q', 'q_dlq')"),
            0
        );
        assert_eq!(count("SELECT FROM bussig.message"), 0);
        assert_eq!(count("SELECT FROM bussig.dedup"), 0);
        // A dead-letter queue that others use is refused, and survives its users one at a time.
        assert_fails("SELECT bussig.drop_queue('shared')", "2BP01");
        run("SELECT bussig.drop_queue('other')");
        assert_eq!(count("SELECT FROM bussig.queue WHERE name = 'shared'"), 1);
        assert_fails("SELECT bussig.drop_queue('bad name')", "22023");
        assert_fails("SELECT bussig.drop_queue(NULL)", "22004");
    }

    #[pg_test]
    fn purge_queue_counts_what_it_deletes() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.create_queue('keep')");
        run("SELECT bussig.send_batch('q', ARRAY['1', '2', '3']::jsonb[])");
        run("SELECT bussig.send('keep', '1')");
        assert_eq!(one::<i64>("SELECT bussig.purge_queue('q')"), Some(3));
        assert_eq!(one::<i64>("SELECT bussig.purge_queue('q')"), Some(0));
        assert_eq!(messages_in("keep"), 1);
        assert_fails("SELECT bussig.purge_queue('missing')", "42704");
        assert_fails("SELECT bussig.purge_queue(NULL)", "22004");
    }

    #[pg_test]
    fn dead_letter_queues_cannot_form_a_circle() {
        run("SELECT bussig.create_queue('orders')");
        assert_fails(
            "SELECT bussig.alter_queue('orders_dlq', dead_letter_queue => 'orders')",
            "22023",
        );
        run("SELECT bussig.create_queue('a', dead_letter_queue => 'b')");
        run("SELECT bussig.alter_queue('b', dead_letter_queue => 'c')");
        assert_fails(
            "SELECT bussig.alter_queue('c', dead_letter_queue => 'a')",
            "22023",
        );
        assert_eq!(
            one::<bool>("SELECT dead_letter_queue IS NULL FROM bussig.queues WHERE queue = 'c'"),
            Some(true)
        );
        // A chain that does not come back is fine.
        run("SELECT bussig.alter_queue('c', dead_letter_queue => 'final')");
    }

    #[pg_test]
    fn an_existing_queue_with_a_long_name_is_not_an_error() {
        let name = "l".repeat(60);
        run(&format!(
            "SELECT bussig.create_queue('{name}', dead_letter_queue => 'failed')"
        ));
        assert_eq!(
            one::<bool>(&format!("SELECT bussig.create_queue('{name}')")),
            Some(false)
        );
        assert_eq!(
            one::<bool>(&format!("SELECT bussig.subscribe('{name}', 'x.>')")),
            Some(true)
        );
    }

    #[pg_test]
    fn queues_view_counts_states() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.send_batch('q', ARRAY['1', '2', '3']::jsonb[])");
        run("SELECT bussig.send('q', '4', delay => '1 hour')");
        run("SELECT * FROM bussig.read('q')");
        run("SELECT bussig.run_maintenance()");
        assert_eq!(
            one::<String>("SELECT format('%s %s %s %s', ready, delayed, locked, oldest_ready_age IS NOT NULL) FROM bussig.queues WHERE queue = 'q'")
                .as_deref(),
            Some("2 1 1 t")
        );
    }

    #[pg_test]
    fn retry_backoff_grows_and_caps() {
        assert_eq!(
            one::<String>("SELECT string_agg(bussig.retry_backoff('1 second', 2, '1 minute', n)::text, ' ') FROM generate_series(1, 8) n")
                .as_deref(),
            Some("00:00:01 00:00:02 00:00:04 00:00:08 00:00:16 00:00:32 00:01:00 00:01:00")
        );
        assert_eq!(
            one::<String>(
                "SELECT bussig.retry_backoff('1 second', 10, '1 hour', 2147483647)::text"
            )
            .as_deref(),
            Some("01:00:00")
        );
        assert_eq!(
            one::<String>("SELECT bussig.retry_backoff('0', 2, '1 hour', 50)::text").as_deref(),
            Some("00:00:00")
        );
    }

    /// create_queue's SQL defaults and the defaults a dead-letter queue is made with are written in
    /// two places (pgrx takes only literals as defaults); they must agree.
    #[pg_test]
    fn a_queues_sql_defaults_match_those_its_dead_letter_queue_gets() {
        run("SELECT bussig.create_queue('defaults')");
        let settings = "max_deliveries, lock_timeout, message_ttl, retry_delay, retry_delay_max,
                        retry_multiplier, dedup_window";
        assert_eq!(
            count(&format!(
                "SELECT DISTINCT {settings} FROM bussig.queues WHERE queue IN ('defaults', 'defaults_dlq')"
            )),
            1
        );
    }
}
