//! #[pg_test]s of send and send_batch, the direct writes among them.
//! Each runs inside one transaction, rolled back afterwards, so time does not pass within a test: lock
//! expiry and TTL are simulated by moving timestamps back.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::*;

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
}
