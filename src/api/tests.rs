//! Unit tests of every SQL function, run inside one transaction each (rolled back afterwards), so
//! time does not pass within a test: lock expiry and TTL are simulated by moving timestamps back.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::api::test_support::*;

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
    fn send_stores_everything_it_is_given() {
        run("SELECT bussig.create_queue('q')");
        let id = one::<i64>(
            r#"SELECT bussig.send('q', '{"order": 1}', headers => '{"h": "v"}', delay => '1 minute',
                 priority => 7, correlation_id => 'c', reply_to => 'replies')"#,
        )
        .unwrap();
        assert_eq!(
            one::<String>(&format!(
                "SELECT format('%s %s %s %s %s %s %s', state, payload, headers, priority, correlation_id, reply_to,
                               date_trunc('second', visible_at - enqueued_at))
                 FROM bussig.peek('q') WHERE message_id = {id}"
            ))
            .as_deref(),
            Some(r#"delayed {"order": 1} {"h": "v"} 7 c replies 00:01:00"#)
        );
    }

    #[pg_test]
    fn send_rejects_bad_input_and_enqueues_nothing() {
        run("SELECT bussig.create_queue('q')");
        assert_all_fail(&[
            ("SELECT bussig.send('missing', '1')", "42704"),
            ("SELECT bussig.send('bad name', '1')", "22023"),
            ("SELECT bussig.send(NULL, '1')", "22004"),
            ("SELECT bussig.send('q', NULL)", "22004"),
            ("SELECT bussig.send('q', '1', headers => '[1]')", "22023"),
            ("SELECT bussig.send('q', '1', headers => '\"text\"')", "22023"),
            ("SELECT bussig.send('q', '1', delay => '-1 second')", "22023"),
            ("SELECT bussig.send('q', '1', priority => NULL)", "22004"),
            ("SELECT bussig.send('q', jsonb_build_object('x', repeat('a', 1048576)))", "54000"),
            ("SELECT bussig.send('q', '1', headers => jsonb_build_object('x', repeat('a', 1048576)))", "54000"),
        ]);
        assert_eq!(count("SELECT FROM bussig.message"), 0);
        assert_eq!(count("SELECT FROM bussig.queue WHERE name = 'missing'"), 0);
    }

    #[pg_test]
    fn send_size_limit_is_a_setting() {
        run("SELECT bussig.create_queue('q')");
        run("SET LOCAL bussig.max_message_size = '2kB'");
        assert_fails(
            "SELECT bussig.send('q', to_jsonb(repeat('a', 2100)))",
            "54000",
        );
        assert!(one::<i64>("SELECT bussig.send('q', to_jsonb(repeat('a', 1900)))").is_some());
    }

    #[pg_test]
    fn send_auto_creates_queues_only_when_allowed() {
        assert_fails("SELECT bussig.send('fresh', '1')", "42704");
        run("SET LOCAL bussig.auto_create_queues = on");
        assert!(one::<i64>("SELECT bussig.send('fresh', '1')").is_some());
        assert_eq!(
            one::<String>("SELECT dead_letter_queue FROM bussig.queues WHERE queue = 'fresh'")
                .as_deref(),
            Some("fresh_dlq")
        );
        assert_eq!(messages_in("fresh"), 1);
    }

    #[pg_test]
    fn send_deduplicates_within_the_window() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.create_queue('other')");
        assert!(one::<i64>("SELECT bussig.send('q', '1', dedup_id => 'k')").is_some());
        assert_eq!(
            one::<i64>("SELECT bussig.send('q', '2', dedup_id => 'k')"),
            None
        );
        // Keys are per queue.
        assert!(one::<i64>("SELECT bussig.send('other', '3', dedup_id => 'k')").is_some());
        assert_eq!(messages_in("q"), 1);
        // Once the window has passed, the key is free again.
        run("UPDATE bussig.dedup SET expires_at = now() - interval '1 second'");
        assert!(one::<i64>("SELECT bussig.send('q', '4', dedup_id => 'k')").is_some());
        assert_eq!(messages_in("q"), 2);
        assert_fails(
            "SELECT bussig.send('missing', '1', dedup_id => 'k')",
            "42704",
        );
    }

    #[pg_test]
    fn send_batch_returns_ids_in_input_order() {
        run("SELECT bussig.create_queue('q')");
        let ids = Spi::connect(|client| {
            client
                .select("SELECT bussig.send_batch('q', ARRAY['\"a\"', '\"b\"', '\"c\"']::jsonb[], priority => 2)", None, &[])
                .unwrap()
                .map(|row| row.get::<i64>(1).unwrap().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(ids.len(), 3);
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(
            one::<String>("SELECT string_agg(payload #>> '{}', '' ORDER BY message_id) FROM bussig.peek('q') WHERE priority = 2")
                .as_deref(),
            Some("abc")
        );
        assert_eq!(count("SELECT bussig.send_batch('q', ARRAY[]::jsonb[])"), 0);
    }

    /// A value of the id sequence stands for the ids since the value before it: a batch larger than
    /// one step, a step changed by ALTER SEQUENCE and the sequence's maximum all still give distinct,
    /// increasing ids, or nextval's own error with nothing written.
    #[pg_test]
    fn send_batch_ids_stay_unique_across_sequence_steps() {
        run("SELECT bussig.create_queue('q')");
        let batch = |size: i32| {
            count(&format!(
                "SELECT bussig.send_batch('q', array_fill('{{}}'::jsonb, ARRAY[{size}]))"
            ))
        };
        let ids = || -> Vec<i64> {
            Spi::connect(|client| {
                client
                    .select(
                        "SELECT message_id FROM bussig.message ORDER BY message_id",
                        None,
                        &[],
                    )
                    .unwrap()
                    .map(|row| row.get::<i64>(1).unwrap().unwrap())
                    .collect()
            })
        };
        let last_value = || one::<i64>("SELECT last_value FROM bussig.message_id_seq").unwrap();
        // Locks the sequence until the test ends: other tests' sends wait, and its values follow
        // each other.
        run("ALTER SEQUENCE bussig.message_id_seq INCREMENT BY 128");
        // Past the sequence's first value, which stands for itself alone.
        assert_eq!(count("SELECT bussig.send('q', '0')"), 1);
        assert_eq!(batch(300), 300);
        let first = ids();
        // 300 messages, three values 128 apart, each standing for the 128 ids up to it.
        assert_eq!(first.len(), 301);
        assert_eq!(first[300] - first[1], 299);
        assert_eq!(last_value(), first[1] + 383);

        run("ALTER SEQUENCE bussig.message_id_seq INCREMENT BY 1");
        assert_eq!(batch(300), 300);
        assert_eq!(count("SELECT bussig.send('q', '1')"), 1);
        let all = ids();
        assert_eq!(all.len(), 602);
        assert!(all.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(all[601], last_value());

        run("ALTER SEQUENCE bussig.message_id_seq INCREMENT BY 128");
        let last = last_value();
        run(&format!(
            "ALTER SEQUENCE bussig.message_id_seq MAXVALUE {}",
            last + 200
        ));
        assert_eq!(batch(100), 100);
        assert_fails(
            "SELECT bussig.send_batch('q', array_fill('{}'::jsonb, ARRAY[300]))",
            "2200H",
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM bussig.message"), Some(702));
        assert_eq!(
            one::<i64>("SELECT max(message_id) FROM bussig.message"),
            Some(last + 100)
        );
    }

    #[pg_test]
    fn send_batch_is_all_or_nothing() {
        run("SELECT bussig.create_queue('q')");
        assert_all_fail(&[
            (
                "SELECT bussig.send_batch('q', ARRAY['1', NULL]::jsonb[])",
                "22004",
            ),
            ("SELECT bussig.send_batch('q', NULL)", "22004"),
            (
                "SELECT bussig.send_batch('q', ARRAY['1', to_jsonb(repeat('a', 1048576))])",
                "54000",
            ),
            (
                "SELECT bussig.send_batch('q', ARRAY['1']::jsonb[], headers => '1')",
                "22023",
            ),
            (
                "SELECT bussig.send_batch('q', ARRAY['1']::jsonb[], delay => '-1 s')",
                "22023",
            ),
            (
                "SELECT bussig.send_batch('missing', ARRAY['1']::jsonb[])",
                "42704",
            ),
            (
                "SELECT bussig.send_batch('missing', ARRAY[]::jsonb[])",
                "42704",
            ),
        ]);
        assert_eq!(count("SELECT FROM bussig.message"), 0);
    }

    // Sends write heap and index entries directly (direct_insert.rs): every row must be complete,
    // toasted when large, and in both indexes, however many flushes a batch takes.
    #[pg_test]
    fn sends_write_complete_rows_and_index_entries() {
        run("CREATE EXTENSION IF NOT EXISTS amcheck");
        run("SELECT bussig.create_queue('q')");
        let large = "(SELECT jsonb_build_object('d', string_agg(md5(g::text), '')) FROM generate_series(1, 20000) g)";
        let id = one::<i64>(&format!(
            "SELECT bussig.send('q', {large}, headers => '{{\"h\": 1}}')"
        ))
        .unwrap();
        let ids = Spi::connect(|client| {
            client
                .select(
                    "SELECT bussig.send_batch('q', array(SELECT to_jsonb(g) FROM generate_series(1, 2500) g),
                                             delay => '1 hour', priority => 3)",
                    None,
                    &[],
                )
                .unwrap()
                .map(|row| row.get::<i64>(1).unwrap().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(ids.len(), 2500);
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]) && ids[0] > id);
        // One visible_at for the whole batch: written directly, not by the INSERT statement, which
        // takes clock_timestamp() per row.
        assert_eq!(
            count("SELECT DISTINCT visible_at FROM bussig.message WHERE priority = 3"),
            1
        );
        run("SELECT bt_index_check(i, true) FROM unnest(ARRAY['bussig.message_pkey', 'bussig.message_delivery_order',
                                                        'bussig.message_final_lock', 'bussig.message_body']::regclass[]) i");
        assert_eq!(
            one::<bool>(&format!(
                "SELECT payload = {large} AND headers = '{{\"h\": 1}}' FROM bussig.message WHERE message_id = {id}"
            )),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class WHERE oid = 'bussig.message'::regclass"),
            Some(true)
        );
        // Delayed and prioritised as asked, in array order, found through the delivery-order index.
        run("SET LOCAL enable_seqscan = off");
        run("SET LOCAL enable_bitmapscan = off");
        assert_eq!(
            one::<String>(
                "SELECT format('%s %s %s', count(*), bool_and(visible_at > now() + interval '59 minutes'),
                               array_agg(payload::int) = array(SELECT generate_series(1, 2500)))
                 FROM (SELECT payload, visible_at FROM bussig.message
                       WHERE queue_id = (SELECT queue_id FROM bussig.queue WHERE name = 'q') AND priority = 3
                       ORDER BY priority DESC, visible_at, message_id) delivery_order"
            )
            .as_deref(),
            Some("2500 t t")
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT format('%s %s', message_id, payload = {large}) FROM bussig.read('q')"
            ))
            .as_deref(),
            Some(format!("{id} t").as_str())
        );
    }

    // What the table needs beyond its heap and indexes (triggers, defaults of columns added later)
    // the plain INSERT statement does; a read-only transaction gets its error from it.
    #[pg_test]
    fn sends_use_the_insert_statement_when_the_table_needs_it() {
        run("SELECT bussig.create_queue('q')");
        // Written directly, from a description of the table this backend now keeps: every change
        // below must reach it.
        run("SELECT bussig.send('q', '0')");
        run("DELETE FROM bussig.message");
        run("ALTER TABLE bussig.message ALTER COLUMN subject SET NOT NULL");
        assert_fails("SELECT bussig.send('q', '0')", "23502");
        assert_fails(
            "SELECT bussig.send_batch('q', ARRAY['0']::jsonb[])",
            "23502",
        );
        run("ALTER TABLE bussig.message ALTER COLUMN subject DROP NOT NULL");

        run("CREATE TEMP TABLE seen (message_id bigint)");
        run(
            "CREATE FUNCTION pg_temp.note() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN INSERT INTO pg_temp.seen VALUES (NEW.message_id); RETURN NULL; END $$",
        );
        run("CREATE TRIGGER note AFTER INSERT ON bussig.message FOR EACH ROW EXECUTE FUNCTION pg_temp.note()");
        run("SELECT bussig.send('q', '1')");
        run("SELECT bussig.send_batch('q', ARRAY['2', '3']::jsonb[])");
        assert_eq!(
            count("SELECT FROM seen JOIN bussig.message USING (message_id)"),
            3
        );
        run("DROP TRIGGER note ON bussig.message");

        run("ALTER TABLE bussig.message ADD COLUMN extra int DEFAULT 7");
        let id = one::<i64>("SELECT bussig.send('q', '4')").unwrap();
        assert_eq!(
            one::<i32>(&format!(
                "SELECT extra FROM bussig.message WHERE message_id = {id}"
            )),
            Some(7)
        );
        // A dropped column is only a gap in the row: sends are written directly again.
        run("ALTER TABLE bussig.message DROP COLUMN extra");
        assert_eq!(
            count("SELECT bussig.send_batch('q', array(SELECT to_jsonb(g) FROM generate_series(5, 54) g), priority => 1)"),
            50
        );
        assert_eq!(
            count("SELECT DISTINCT visible_at FROM bussig.message WHERE priority = 1"),
            1
        );
        assert_eq!(messages_in("q"), 54);

        for send in [
            "bussig.send('q', '7')",
            "bussig.send_batch('q', ARRAY['8']::jsonb[])",
        ] {
            assert_fails(
                &format!(
                    "DO $$ BEGIN SET LOCAL transaction_read_only = on; PERFORM {send}; END $$"
                ),
                "25006",
            );
        }
        assert_eq!(messages_in("q"), 54);
    }

    // Indexes users add: B-trees, with expressions and predicates, get their entries from direct
    // writes; any other access method makes sends take the INSERT statement. Either way every row
    // is in every index.
    #[pg_test]
    fn sends_fill_the_indexes_users_add() {
        run("CREATE EXTENSION IF NOT EXISTS amcheck");
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.send('q', '{\"k\": 0}')");
        run("CREATE INDEX message_k ON bussig.message ((payload->>'k')) WHERE priority = 2");
        assert_eq!(
            count("SELECT bussig.send_batch('q', array(SELECT jsonb_build_object('k', g) FROM generate_series(1, 300) g), priority => 2)"),
            300
        );
        assert_eq!(
            count("SELECT DISTINCT visible_at FROM bussig.message WHERE priority = 2"),
            1
        );
        run("SELECT bussig.send('q', '{\"k\": 301}', priority => 2)");
        run("SELECT bt_index_check('bussig.message_k', true)");
        // Found through the indexes.
        run("SET LOCAL enable_seqscan = off");
        assert_eq!(
            count(
                "SELECT FROM bussig.message WHERE payload->>'k' IN ('7', '301') AND priority = 2"
            ),
            2
        );

        run("CREATE INDEX message_payload ON bussig.message USING gin (payload)");
        run("SELECT bussig.send('q', '{\"g\": 1}', priority => 3)");
        run("SELECT bussig.send_batch('q', ARRAY['{\"g\": 1}', '{\"g\": 2}']::jsonb[], priority => 3)");
        assert_eq!(
            count("SELECT FROM bussig.message WHERE payload @> '{\"g\": 1}'"),
            2
        );
        run("DROP INDEX bussig.message_payload");
        assert_eq!(
            count("SELECT bussig.send_batch('q', array(SELECT jsonb_build_object('k', g) FROM generate_series(1, 300) g), priority => 4)"),
            300
        );
        assert_eq!(
            count("SELECT DISTINCT visible_at FROM bussig.message WHERE priority = 4"),
            1
        );
        assert_eq!(messages_in("q"), 605);
    }

    #[pg_test]
    fn read_delivers_by_priority_then_age_and_locks() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.send('q', '\"low\"')");
        run("SELECT bussig.send('q', '\"high\"', priority => 5)");
        run("SELECT bussig.send('q', '\"low2\"')");
        run("SELECT bussig.send('q', '\"mid\"', priority => 1)");
        run("SELECT bussig.send('q', '\"later\"', delay => '1 hour', priority => 9)");
        assert_eq!(
            one::<String>("SELECT string_agg(payload #>> '{}', ' ') FROM bussig.read('q', 10)")
                .as_deref(),
            Some("high mid low low2")
        );
        // Locked now: nothing left to read, and each was delivered once under its own token.
        assert_eq!(count("SELECT * FROM bussig.read('q', 10)"), 0);
        assert_eq!(
            count("SELECT FROM bussig.peek('q') WHERE state = 'locked' AND delivery_count = 1"),
            4
        );
        assert_eq!(
            count("SELECT DISTINCT lock_token FROM bussig.message WHERE lock_token IS NOT NULL"),
            4
        );
        assert_eq!(
            count("SELECT FROM bussig.peek('q') WHERE state = 'delayed'"),
            1
        );
    }

    #[pg_test]
    fn lock_tokens_are_distinct_version_4_uuids() {
        assert_eq!(
            count(
                "SELECT DISTINCT t FROM (SELECT bussig.lock_token() AS t FROM generate_series(1, 10000)) g
                 WHERE t::text ~ '^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$'"
            ),
            10000
        );
    }

    #[pg_test]
    fn read_honours_max_messages_and_lock_timeout() {
        run("SELECT bussig.create_queue('q', lock_timeout => '10 minutes')");
        run("SELECT bussig.send_batch('q', ARRAY['1', '2', '3']::jsonb[])");
        assert_eq!(count("SELECT * FROM bussig.read('q')"), 1);
        assert_eq!(
            count("SELECT * FROM bussig.read('q', 1, lock_timeout => '2 seconds')"),
            1
        );
        // Locks run from the wall clock at the read, not from the start of the transaction.
        assert_eq!(
            count("SELECT FROM bussig.message WHERE date_trunc('second', visible_at - now()) = interval '10 minutes'"),
            1
        );
        assert_eq!(
            count("SELECT FROM bussig.message WHERE date_trunc('second', visible_at - now()) = interval '2 seconds'"),
            1
        );
    }

    #[pg_test]
    fn read_redelivers_after_lock_expiry_with_a_new_token() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.send('q', '1')");
        read_into_got("q");
        let_time_pass("q");
        assert_eq!(
            one::<bool>("SELECT r.lock_token <> got.lock_token AND r.delivery_count = 2 FROM bussig.read('q') r, got"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.ack('q', message_id, lock_token) FROM got"),
            Some(false)
        );
    }

    #[pg_test]
    fn read_dead_letters_exhausted_and_expired_messages() {
        run("SELECT bussig.create_queue('q', max_deliveries => 2, message_ttl => '1 hour')");
        run("SELECT bussig.send('q', '\"tired\"', correlation_id => 'c')");
        run("SELECT bussig.send('q', '\"old\"')");
        run("SELECT bussig.send('q', '\"fresh\"')");
        run("UPDATE bussig.message SET delivery_count = 2, last_error = 'boom' WHERE payload = '\"tired\"'");
        run("UPDATE bussig.message SET enqueued_at = now() - interval '2 hours' WHERE payload = '\"old\"'");
        // Both dead ones are skipped and the read still fills up with the fresh one.
        assert_eq!(
            one::<String>("SELECT string_agg(payload #>> '{}', ' ') FROM bussig.read('q', 1)")
                .as_deref(),
            Some("fresh")
        );
        assert_eq!(
            one::<String>(
                "SELECT string_agg(format('%s %s %s %s %s', payload #>> '{}', headers ->> 'bussig-dead-letter-reason',
                        headers ->> 'bussig-dead-letter-error', headers ->> 'bussig-source-queue', delivery_count), ', '
                        ORDER BY message_id)
                 FROM bussig.peek('q_dlq')"
            )
            .as_deref(),
            Some("tired max_deliveries boom q 0, old expired  q 0")
        );
        assert_eq!(
            one::<String>(
                "SELECT correlation_id FROM bussig.peek('q_dlq') WHERE payload = '\"tired\"'"
            )
            .as_deref(),
            Some("c")
        );
    }

    #[pg_test]
    fn a_dead_letter_queue_drops_expired_messages_and_never_dead_letters() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.alter_queue('q_dlq', message_ttl => '1 day', max_deliveries => 1)");
        run("SELECT bussig.send('q_dlq', '\"old\"')");
        run("SELECT bussig.send('q_dlq', '\"retried\"')");
        run("UPDATE bussig.message SET enqueued_at = now() - interval '2 days' WHERE payload = '\"old\"'");
        run("UPDATE bussig.message SET delivery_count = 5 WHERE payload = '\"retried\"'");
        assert_eq!(
            one::<String>("SELECT string_agg(payload #>> '{}', ' ') FROM bussig.read('q_dlq', 5)")
                .as_deref(),
            Some("retried")
        );
        assert_eq!(messages_in("q_dlq"), 1);
    }

    #[pg_test]
    fn read_rejects_bad_input() {
        run("SELECT bussig.create_queue('q')");
        assert_all_fail(&[
            ("SELECT * FROM bussig.read('missing')", "42704"),
            ("SELECT * FROM bussig.read('bad name')", "22023"),
            ("SELECT * FROM bussig.read(NULL)", "22004"),
            ("SELECT * FROM bussig.read('q', 0)", "22023"),
            ("SELECT * FROM bussig.read('q', -1)", "22023"),
            ("SELECT * FROM bussig.read('q', 1001)", "22023"),
            ("SELECT * FROM bussig.read('q', NULL)", "22004"),
            (
                "SELECT * FROM bussig.read('q', 1, lock_timeout => '0')",
                "22023",
            ),
            (
                "SELECT * FROM bussig.read('q', 1, lock_timeout => '-1 s')",
                "22023",
            ),
            ("SELECT * FROM bussig.read('q', 1, wait => '-1 s')", "22023"),
        ]);
        assert_eq!(count("SELECT * FROM bussig.read('q', 1000)"), 0);
    }

    #[pg_test]
    fn ack_removes_only_with_the_latest_token() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.send('q', '1')");
        read_into_got("q");
        assert_eq!(
            one::<bool>("SELECT bussig.ack('q', message_id, gen_random_uuid()) FROM got"),
            Some(false)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.ack('q', message_id, lock_token) FROM got"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.ack('q', message_id, lock_token) FROM got"),
            Some(false)
        );
        assert_eq!(messages_in("q"), 0);
    }

    #[pg_test]
    fn ack_rejects_bad_input() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.create_queue('p')");
        run("SELECT bussig.send('q', '1')");
        read_into_got("q");
        assert_all_fail(&[
            (
                "SELECT bussig.ack('missing', 1, gen_random_uuid())",
                "42704",
            ),
            (
                "SELECT bussig.ack('bad name', 1, gen_random_uuid())",
                "22023",
            ),
            ("SELECT bussig.ack(NULL, 1, gen_random_uuid())", "22004"),
            ("SELECT bussig.ack('q', NULL, gen_random_uuid())", "22004"),
            ("SELECT bussig.ack('q', 1, NULL)", "22004"),
        ]);
        // Settling in the wrong queue does nothing.
        assert_eq!(
            one::<bool>("SELECT bussig.ack('p', message_id, lock_token) FROM got"),
            Some(false)
        );
        assert_eq!(messages_in("q"), 1);
    }

    #[pg_test]
    fn ack_batch_counts_what_it_removes() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.send_batch('q', ARRAY['1', '2', '3']::jsonb[])");
        run("CREATE TEMP TABLE got AS SELECT * FROM bussig.read('q', 3)");
        assert_eq!(
            one::<i64>(
                "SELECT bussig.ack_batch('q', array_agg(message_id), array_agg(CASE WHEN message_id = (SELECT min(message_id) FROM got)
                        THEN gen_random_uuid() ELSE lock_token END)) FROM got"
            ),
            Some(2)
        );
        assert_eq!(messages_in("q"), 1);
        assert_eq!(
            one::<i64>("SELECT bussig.ack_batch('q', ARRAY[]::bigint[], ARRAY[]::uuid[])"),
            Some(0)
        );
        assert_all_fail(&[
            (
                "SELECT bussig.ack_batch('q', ARRAY[1, 2], ARRAY[gen_random_uuid()])",
                "22023",
            ),
            (
                "SELECT bussig.ack_batch('q', NULL, ARRAY[gen_random_uuid()])",
                "22004",
            ),
            ("SELECT bussig.ack_batch('q', ARRAY[1], NULL)", "22004"),
            (
                "SELECT bussig.ack_batch('missing', ARRAY[1], ARRAY[gen_random_uuid()])",
                "42704",
            ),
        ]);
    }

    #[pg_test]
    fn ack_and_read_settles_one_batch_and_locks_the_next() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.send_batch('q', ARRAY['1', '2', '3', '4', '5']::jsonb[])");
        run("CREATE TEMP TABLE got AS SELECT * FROM bussig.ack_and_read('q', max_messages => 2)");
        assert_eq!(count("SELECT * FROM got"), 2);
        for expected_next in [2, 1, 0] {
            run("CREATE TEMP TABLE next AS
                 SELECT * FROM bussig.ack_and_read('q', (SELECT array_agg(message_id) FROM got),
                                                   (SELECT array_agg(lock_token) FROM got), 2)");
            assert_eq!(count("SELECT * FROM next"), expected_next);
            run("DROP TABLE got; ALTER TABLE next RENAME TO got");
        }
        assert_eq!(messages_in("q"), 0);
        // A stale token is skipped, not an error; the read still happens.
        run("SELECT bussig.send('q', '6')");
        assert_eq!(count("SELECT * FROM bussig.ack_and_read('q', ARRAY[1]::bigint[], ARRAY[gen_random_uuid()])"), 1);
        assert_all_fail(&[
            (
                "SELECT * FROM bussig.ack_and_read('q', ARRAY[1, 2], ARRAY[gen_random_uuid()])",
                "22023",
            ),
            (
                "SELECT * FROM bussig.ack_and_read('q', ARRAY[1]::bigint[], NULL)",
                "22004",
            ),
            (
                "SELECT * FROM bussig.ack_and_read('q', NULL, ARRAY[gen_random_uuid()])",
                "22004",
            ),
            (
                "SELECT * FROM bussig.ack_and_read('q', max_messages => 0)",
                "22023",
            ),
            ("SELECT * FROM bussig.ack_and_read('missing')", "42704"),
            ("SELECT * FROM bussig.ack_and_read(NULL)", "22004"),
        ]);
    }

    #[pg_test]
    fn ack_and_read_does_not_wait_once_it_acknowledged() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.send('q', '1')");
        read_into_got("q");
        let waited = one::<f64>(
            "WITH t AS (SELECT clock_timestamp() AS started),
                  r AS (SELECT count(*) FROM bussig.ack_and_read('q', (SELECT array_agg(message_id) FROM got),
                                                                 (SELECT array_agg(lock_token) FROM got),
                                                                 wait => '5 seconds'))
             SELECT extract(epoch FROM clock_timestamp() - started)::float8 FROM t, r",
        )
        .unwrap();
        assert!(waited < 2.0, "waited {waited} s after acknowledging");
        assert_eq!(messages_in("q"), 0);
    }

    #[pg_test]
    fn batch_settlement_refuses_null_elements() {
        run("SELECT bussig.create_queue('q')");
        assert_fails("SELECT bussig.ack_batch('q', ARRAY[1, NULL], ARRAY[gen_random_uuid(), gen_random_uuid()])", "22004");
        assert_fails(
            "SELECT bussig.ack_batch('q', ARRAY[1, 2], ARRAY[gen_random_uuid(), NULL])",
            "22004",
        );
        assert_fails("SELECT * FROM bussig.ack_and_read('q', ARRAY[NULL]::bigint[], ARRAY[gen_random_uuid()])", "22004");
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
    fn nack_gives_back_with_backoff_or_delay() {
        run("SELECT bussig.create_queue('q', retry_delay => '10 seconds', retry_multiplier => 3, retry_delay_max => '1 minute')");
        run("SELECT bussig.send('q', '1')");
        read_into_got("q");
        assert_eq!(
            one::<bool>("SELECT bussig.nack('q', message_id, lock_token, error => 'e1') FROM got"),
            Some(true)
        );
        assert_eq!(
            one::<String>("SELECT format('%s %s %s', state, date_trunc('second', visible_at - now()), delivery_count) FROM bussig.peek('q')").as_deref(),
            Some("delayed 00:00:10 1")
        );
        // A nacked delivery is settled: its token no longer acks.
        assert_eq!(
            one::<bool>("SELECT bussig.ack('q', message_id, lock_token) FROM got"),
            Some(false)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.nack('q', message_id, lock_token) FROM got"),
            Some(false)
        );
        let_time_pass("q");
        read_into_got("q");
        run("SELECT bussig.nack('q', message_id, lock_token) FROM got");
        assert_eq!(
            one::<String>(
                "SELECT date_trunc('second', visible_at - now())::text FROM bussig.peek('q')"
            )
            .as_deref(),
            Some("00:00:30")
        );
        let_time_pass("q");
        read_into_got("q");
        run("SELECT bussig.nack('q', message_id, lock_token) FROM got");
        assert_eq!(
            one::<String>(
                "SELECT date_trunc('second', visible_at - now())::text FROM bussig.peek('q')"
            )
            .as_deref(),
            Some("00:01:00")
        );
        let_time_pass("q");
        read_into_got("q");
        run("SELECT bussig.nack('q', message_id, lock_token, delay => '0') FROM got");
        assert_eq!(
            one::<String>("SELECT state FROM bussig.peek('q')").as_deref(),
            Some("ready")
        );
        assert_eq!(
            one::<String>("SELECT last_error FROM bussig.message").as_deref(),
            Some("e1")
        );
    }

    #[pg_test]
    fn nack_on_the_last_delivery_dead_letters() {
        run("SELECT bussig.create_queue('q', max_deliveries => 1)");
        run("SELECT bussig.send('q', '1', reply_to => 'r')");
        read_into_got("q");
        assert_eq!(
            one::<bool>(
                "SELECT bussig.nack('q', message_id, lock_token, error => 'boom') FROM got"
            ),
            Some(true)
        );
        assert_eq!(messages_in("q"), 0);
        assert_eq!(
            one::<String>(
                "SELECT format('%s %s %s %s', headers ->> 'bussig-dead-letter-reason', headers ->> 'bussig-dead-letter-error',
                               headers ->> 'bussig-source-queue', reply_to) FROM bussig.peek('q_dlq')"
            )
            .as_deref(),
            Some("max_deliveries boom q r")
        );
        assert_all_fail(&[
            (
                "SELECT bussig.nack('missing', 1, gen_random_uuid())",
                "42704",
            ),
            (
                "SELECT bussig.nack('q', 1, gen_random_uuid(), delay => '-1 s')",
                "22023",
            ),
            ("SELECT bussig.nack('q', NULL, gen_random_uuid())", "22004"),
        ]);
    }

    #[pg_test]
    fn extend_lock_moves_the_deadline() {
        run("SELECT bussig.create_queue('q', lock_timeout => '1 minute')");
        run("SELECT bussig.send('q', '1')");
        read_into_got("q");
        assert_eq!(
            one::<bool>(
                "SELECT bussig.extend_lock('q', message_id, lock_token, '1 hour') FROM got"
            ),
            Some(true)
        );
        assert_eq!(
            one::<String>(
                "SELECT date_trunc('second', visible_at - now())::text FROM bussig.peek('q')"
            )
            .as_deref(),
            Some("01:00:00")
        );
        assert_eq!(
            one::<bool>("SELECT bussig.extend_lock('q', message_id, lock_token) FROM got"),
            Some(true)
        );
        assert_eq!(
            one::<String>(
                "SELECT date_trunc('second', visible_at - now())::text FROM bussig.peek('q')"
            )
            .as_deref(),
            Some("00:01:00")
        );
        assert_eq!(
            one::<bool>("SELECT bussig.extend_lock('q', message_id, gen_random_uuid()) FROM got"),
            Some(false)
        );
        assert_all_fail(&[
            (
                "SELECT bussig.extend_lock('q', 1, gen_random_uuid(), '0')",
                "22023",
            ),
            (
                "SELECT bussig.extend_lock('missing', 1, gen_random_uuid())",
                "42704",
            ),
            ("SELECT bussig.extend_lock('q', 1, NULL)", "22004"),
        ]);
    }

    #[pg_test]
    fn dead_letter_moves_now_with_reason() {
        run("SELECT bussig.create_queue('q')");
        run(
            r#"SELECT bussig.send('q', '{"a": 1}', headers => '{"keep": "me"}', correlation_id => 'c')"#,
        );
        read_into_got("q");
        assert_eq!(
            one::<bool>("SELECT bussig.dead_letter('q', message_id, gen_random_uuid()) FROM got"),
            Some(false)
        );
        assert_eq!(one::<bool>("SELECT bussig.dead_letter('q', message_id, lock_token, 'poison', 'bad field') FROM got"), Some(true));
        assert_eq!(
            one::<bool>("SELECT bussig.dead_letter('q', message_id, lock_token) FROM got"),
            Some(false)
        );
        assert_eq!(
            one::<String>(
                "SELECT format('%s %s %s %s %s', state, headers ->> 'keep', headers ->> 'bussig-dead-letter-reason',
                               headers ->> 'bussig-dead-letter-error', correlation_id) FROM bussig.peek('q_dlq')"
            )
            .as_deref(),
            Some("ready me poison bad field c")
        );
        assert_fails(
            "SELECT bussig.dead_letter('q_dlq', 1, gen_random_uuid())",
            "55000",
        );
        assert_fails(
            "SELECT bussig.dead_letter('q', 1, gen_random_uuid(), NULL)",
            "22004",
        );
        assert_fails(
            "SELECT bussig.dead_letter('missing', 1, gen_random_uuid())",
            "42704",
        );
    }

    #[pg_test]
    fn redrive_brings_dead_letters_home_oldest_first() {
        run("SELECT bussig.create_queue('a', dead_letter_queue => 'dlq')");
        run("SELECT bussig.create_queue('b', dead_letter_queue => 'dlq')");
        for (queue, payload) in [("a", "1"), ("b", "2"), ("a", "3"), ("a", "4")] {
            run(&format!("SELECT bussig.send('{queue}', '{payload}')"));
            read_into_got(queue);
            run(&format!(
                "SELECT bussig.dead_letter('{queue}', message_id, lock_token) FROM got"
            ));
        }
        assert_eq!(one::<i64>("SELECT bussig.redrive('a', 2)"), Some(2));
        assert_eq!(
            one::<String>("SELECT string_agg(format('%s:%s:%s', payload, delivery_count, headers IS NULL), ' ') FROM bussig.read('a', 10)").as_deref(),
            Some("1:1:t 3:1:t")
        );
        assert_eq!(one::<i64>("SELECT bussig.redrive('a')"), Some(1));
        assert_eq!(one::<i64>("SELECT bussig.redrive('a')"), Some(0));
        assert_eq!(messages_in("dlq"), 1);
        assert_all_fail(&[
            ("SELECT bussig.redrive('dlq')", "55000"),
            ("SELECT bussig.redrive('missing')", "42704"),
            ("SELECT bussig.redrive('a', 0)", "22023"),
            ("SELECT bussig.redrive(NULL)", "22004"),
        ]);
    }

    #[pg_test]
    fn peek_browses_in_delivery_order_without_locking() {
        run("SELECT bussig.create_queue('q')");
        run("SELECT bussig.send('q', '\"delayed\"', delay => '1 hour')");
        run("SELECT bussig.send('q', '\"ready\"')");
        run("SELECT bussig.send('q', '\"urgent\"', priority => 3)");
        run("SELECT bussig.send('q', '\"locked\"')");
        run("UPDATE bussig.message SET lock_token = gen_random_uuid(), visible_at = now() + interval '1 minute' WHERE payload = '\"locked\"'");
        assert_eq!(
            one::<String>("SELECT string_agg(format('%s=%s', payload #>> '{}', state), ' ') FROM bussig.peek('q')").as_deref(),
            Some("urgent=ready ready=ready locked=locked delayed=delayed")
        );
        assert_eq!(count("SELECT * FROM bussig.peek('q', 2)"), 2);
        assert_eq!(
            count("SELECT FROM bussig.message WHERE delivery_count > 0"),
            0
        );
        assert_all_fail(&[
            ("SELECT * FROM bussig.peek('q', 0)", "22023"),
            ("SELECT * FROM bussig.peek('q', 1001)", "22023"),
            ("SELECT * FROM bussig.peek('missing')", "42704"),
            ("SELECT * FROM bussig.peek(NULL)", "22004"),
        ]);
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

    #[pg_test]
    fn callers_search_path_reaches_no_statement_and_is_kept() {
        run("SELECT bussig.create_queue('q')");
        run("CREATE SCHEMA evil");
        run(
            "CREATE FUNCTION evil.gen_random_uuid() RETURNS uuid LANGUAGE plpgsql
             AS $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$",
        );
        run(
            "CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql
             AS $$ SELECT 'infinity'::timestamptz $$",
        );
        run("SET LOCAL search_path = evil, pg_catalog, public");
        // An error raised while bussig's path is in force is rolled back with it.
        run(
            "CREATE FUNCTION evil.refuse() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$",
        );
        run("CREATE TRIGGER refuse BEFORE INSERT ON bussig.message
             FOR EACH ROW EXECUTE FUNCTION evil.refuse()");
        assert_fails("SELECT bussig.send('q', '{}')", "P0001");
        run("DROP TRIGGER refuse ON bussig.message");
        // With a trigger on the table a send runs its INSERT statement, which must not reach
        // evil.clock_timestamp (that would delay the message forever).
        run(
            "CREATE FUNCTION evil.pass() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RETURN NEW; END $$",
        );
        run("CREATE TRIGGER pass BEFORE INSERT ON bussig.message
             FOR EACH ROW EXECUTE FUNCTION evil.pass()");
        assert!(one::<i64>("SELECT bussig.send('q', '{\"n\": 0}')").is_some());
        run("DROP TRIGGER pass ON bussig.message");
        assert!(one::<i64>("SELECT bussig.send('q', '{\"n\": 1}')").is_some());
        assert_eq!(count("SELECT FROM bussig.read('q', 10)"), 2);
        assert_eq!(
            one::<String>("SELECT current_setting('search_path')").as_deref(),
            Some("evil, pg_catalog, public")
        );
        assert_eq!(
            one::<String>("SELECT (current_schemas(false))[1]::text").as_deref(),
            Some("evil")
        );
        // The caller's own statements still resolve through the caller's path.
        assert_eq!(
            sqlstate_of("SELECT gen_random_uuid()").as_deref(),
            Some("P0001")
        );
    }

    /// The `n` of each message one read delivers, in the order it delivers them.
    fn read_numbers(queue: &str, max_messages: i32) -> String {
        one::<String>(&format!(
            "SELECT coalesce(string_agg(payload->>'n', ',' ORDER BY delivered), '')
             FROM bussig.read('{queue}', {max_messages}) WITH ORDINALITY AS r(message_id, lock_token, subject,
                  payload, headers, delivery_count, priority, enqueued_at, correlation_id, reply_to, delivered)"
        ))
        .unwrap_or_default()
    }

    fn send_numbers(queue: &str, numbers: std::ops::RangeInclusive<i32>, priority: i32) {
        run(&format!(
            "SELECT bussig.send_batch('{queue}', array_agg(jsonb_build_object('n', n) ORDER BY n),
                                      priority => {priority})
             FROM generate_series({}, {}) n",
            numbers.start(),
            numbers.end()
        ));
    }

    #[pg_test]
    fn reads_through_a_backlog_deliver_in_order() {
        run("SELECT bussig.create_queue('q')");
        send_numbers("q", 1..=25, 0);
        assert_eq!(read_numbers("q", 10), "1,2,3,4,5,6,7,8,9,10");
        assert_eq!(read_numbers("q", 10), "11,12,13,14,15,16,17,18,19,20");
        // A higher priority sent meanwhile comes first.
        send_numbers("q", 100..=101, 5);
        assert_eq!(read_numbers("q", 3), "100,101,21");
        assert_eq!(read_numbers("q", 10), "22,23,24,25");
        assert_eq!(read_numbers("q", 10), "");
    }

    #[pg_test]
    fn a_message_back_behind_the_last_read_is_still_delivered() {
        run("SELECT bussig.create_queue('q')");
        send_numbers("q", 1..=25, 0);
        assert_eq!(read_numbers("q", 10), "1,2,3,4,5,6,7,8,9,10");
        // As when the reader that had locked it rolls back: ready again, at its old place.
        run("UPDATE bussig.message SET visible_at = '2000-01-01', lock_token = NULL WHERE payload->>'n' = '3'");
        let mut rest = Vec::new();
        loop {
            let numbers = read_numbers("q", 10);
            if numbers.is_empty() {
                break;
            }
            rest.extend(numbers.split(',').map(|n| n.parse::<i32>().unwrap()));
        }
        rest.sort_unstable();
        let expected: Vec<i32> = std::iter::once(3).chain(11..=25).collect();
        assert_eq!(rest, expected, "delivered once each, none left behind");
    }
}
