//! #[pg_test]s of creating, changing and dropping streams, of appends, and of privileges on streams.
//! Each runs in one transaction, rolled back afterwards.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::*;

    /// Every record of a partition as "seq:key:payload", numbering what committed first.
    pub fn records(stream: &str, partition: i32) -> Vec<String> {
        Spi::connect(|client| {
            client
                .select(
                    "SELECT format('%s:%s:%s', seq, coalesce(key, '-'), payload)
                     FROM bussig.stream_range($1, $2, 1, 1000)",
                    None,
                    &[stream.into(), partition.into()],
                )
                .unwrap()
                .map(|row| row.get::<String>(1).unwrap().unwrap())
                .collect()
        })
    }

    #[pg_test]
    fn create_stream_makes_a_stream_once() {
        assert_eq!(
            one::<bool>("SELECT bussig.create_stream('events', 4)"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.create_stream('events', 8, '1 day')"),
            Some(false)
        );
        assert_eq!(
            one::<String>(
                "SELECT format('%s %s %s %s', partitions, records, retention, coalesce(retention_bytes::text, '-'))
                 FROM bussig.streams WHERE stream = 'events'"
            )
            .as_deref(),
            Some("4 0 7 days -")
        );
        // The records' table with its ring of segments, and one row per partition.
        assert_eq!(
            count("SELECT FROM pg_inherits
                   WHERE inhparent = ('bussig.stream_' || (SELECT stream_id FROM bussig.stream WHERE name = 'events'))::regclass"),
            4
        );
        assert_eq!(
            count("SELECT FROM bussig.stream_partition JOIN bussig.stream USING (stream_id) WHERE name = 'events'"),
            4
        );
    }

    #[pg_test]
    fn create_stream_rejects_bad_input_and_creates_nothing() {
        assert_all_fail(&[
            ("SELECT bussig.create_stream('bad name')", "22023"),
            ("SELECT bussig.create_stream('')", "22023"),
            ("SELECT bussig.create_stream('_x')", "22023"),
            ("SELECT bussig.create_stream(repeat('s', 61))", "22023"),
            (
                "SELECT bussig.create_stream('x''; DROP TABLE bussig.stream; --')",
                "22023",
            ),
            ("SELECT bussig.create_stream('s', 0)", "22023"),
            ("SELECT bussig.create_stream('s', 257)", "22023"),
            ("SELECT bussig.create_stream('s', -1)", "22023"),
            (
                "SELECT bussig.create_stream('s', retention => '0')",
                "22023",
            ),
            (
                "SELECT bussig.create_stream('s', retention => '-1 day')",
                "22023",
            ),
            (
                "SELECT bussig.create_stream('s', retention => '100000 years')",
                "22023",
            ),
            (
                "SELECT bussig.create_stream('s', retention_bytes => 0)",
                "22023",
            ),
            (
                "SELECT bussig.create_stream('s', retention_bytes => -5)",
                "22023",
            ),
            ("SELECT bussig.create_stream(NULL)", "22004"),
            ("SELECT bussig.create_stream('s', NULL)", "22004"),
            (
                "SELECT bussig.create_stream('s', retention => NULL)",
                "22004",
            ),
        ]);
        assert_eq!(count("SELECT FROM bussig.stream"), 0);
        assert_eq!(count("SELECT FROM pg_class WHERE relname LIKE 'stream\\_%' AND relnamespace = 'bussig'::regnamespace AND relname ~ '^stream_[0-9]'"), 0);
    }

    #[pg_test]
    fn alter_stream_changes_retention_only_where_given() {
        run("SELECT bussig.create_stream('events', retention => '1 day', retention_bytes => 1000000)");
        run("SELECT bussig.alter_stream('events', retention => '2 hours')");
        let settings = "SELECT format('%s %s', retention, coalesce(retention_bytes::text, '-')) FROM bussig.streams";
        assert_eq!(one::<String>(settings).as_deref(), Some("02:00:00 1000000"));
        run("SELECT bussig.alter_stream('events', retention_bytes => 0)");
        assert_eq!(one::<String>(settings).as_deref(), Some("02:00:00 -"));
        assert_all_fail(&[
            (
                "SELECT bussig.alter_stream('nope', retention => '1 day')",
                "42704",
            ),
            ("SELECT bussig.alter_stream('bad name')", "22023"),
            ("SELECT bussig.alter_stream(NULL)", "22004"),
            (
                "SELECT bussig.alter_stream('events', retention => '0')",
                "22023",
            ),
            (
                "SELECT bussig.alter_stream('events', retention_bytes => -1)",
                "22023",
            ),
        ]);
        assert_eq!(one::<String>(settings).as_deref(), Some("02:00:00 -"));
    }

    #[pg_test]
    fn drop_stream_takes_records_groups_grants_and_subscriptions_along() {
        run("SELECT bussig.create_stream('events', 2)");
        run("SELECT bussig.append('events', '{\"a\": 1}')");
        run("SELECT bussig.create_consumer_group('events', 'g')");
        run("SELECT bussig.subscribe_stream('events', 'orders.>')");
        run("SELECT bussig.grant('events', 'public', ARRAY['read'])");
        let table: String = one("SELECT 'bussig.stream_' || stream_id FROM bussig.stream").unwrap();
        assert_eq!(
            one::<bool>("SELECT bussig.drop_stream('events')"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.drop_stream('events')"),
            Some(false)
        );
        assert_eq!(
            one::<bool>(&format!("SELECT to_regclass('{table}') IS NULL")),
            Some(true)
        );
        for table in [
            "stream",
            "stream_partition",
            "stream_segment",
            "consumer_group",
            "group_partition",
            "stream_grant",
            "stream_subscription",
        ] {
            assert_eq!(count(&format!("SELECT FROM bussig.{table}")), 0, "{table}");
        }
        assert_fails("SELECT bussig.drop_stream('bad name')", "22023");
        assert_fails("SELECT bussig.drop_stream(NULL)", "22004");
    }

    #[pg_test]
    fn append_puts_a_key_in_one_partition_and_records_are_numbered_in_order() {
        run("SELECT bussig.create_stream('events', 4)");
        let partition: i64 = one("SELECT bussig.append('events', '1', key => 'k1')").unwrap();
        for n in 2..=5 {
            assert_eq!(
                one::<i64>(&format!(
                    "SELECT bussig.append('events', '{n}', key => 'k1')"
                )),
                Some(partition)
            );
        }
        let partition = partition as i32;
        assert_eq!(
            records("events", partition),
            ["1:k1:1", "2:k1:2", "3:k1:3", "4:k1:4", "5:k1:5"]
        );
        // Numbers once given stay: a second look sees the same.
        assert_eq!(records("events", partition).len(), 5);
        // Records without a key are spread over the partitions.
        run("SELECT bussig.append('events', '0') FROM generate_series(1, 8)");
        assert_eq!(
            count(
                "SELECT DISTINCT partition FROM bussig.stream_range('events', 0, 1) UNION ALL
                   SELECT DISTINCT partition FROM bussig.stream_range('events', 1, 1) UNION ALL
                   SELECT DISTINCT partition FROM bussig.stream_range('events', 2, 1) UNION ALL
                   SELECT DISTINCT partition FROM bussig.stream_range('events', 3, 1)"
            ),
            4
        );
        assert_eq!(one::<i64>("SELECT records FROM bussig.streams"), Some(13));
        assert_eq!(
            one::<String>(
                "SELECT format('%s %s %s', subject, headers, appended_at <= clock_timestamp())
                 FROM bussig.stream_range('events', bussig.append('events', '{}', 'orders.new', '{\"h\": 1}', 'k9')::int,
                                          1, 1000)
                 WHERE key = 'k9'"
            )
            .as_deref(),
            Some("orders.new {\"h\": 1} t")
        );
    }

    #[pg_test]
    fn a_rolled_back_append_leaves_no_gap() {
        run("SELECT bussig.create_stream('events')");
        run("SELECT bussig.append('events', '1')");
        assert_eq!(
            sqlstate_of(
                "DO $$ BEGIN PERFORM bussig.append('events', '2'); RAISE EXCEPTION 'undo'; END $$"
            )
            .as_deref(),
            Some("P0001")
        );
        run("SELECT bussig.append('events', '3')");
        assert_eq!(records("events", 0), ["1:-:1", "2:-:3"]);
    }

    #[pg_test]
    fn retention_empties_a_due_segment_and_leaves_the_callers_lock_timeout() {
        run("SELECT bussig.create_stream('events', 2, retention => '0.2 seconds')");
        run("SELECT bussig.append_batch('events', array['1', '2', '3']::jsonb[], keys => array['a', 'b', 'c'])");
        // Half the retention on, the segment closes; a retention later it is due.
        run("SELECT pg_sleep(0.15), bussig.run_maintenance()");
        run("SELECT pg_sleep(0.25)");
        run("SET LOCAL lock_timeout = '7s'");
        assert_eq!(
            one::<i64>("SELECT (bussig.run_maintenance()->>'emptied_stream_segments')::bigint"),
            Some(1)
        );
        assert_eq!(one::<String>("SHOW lock_timeout").as_deref(), Some("7s"));
        assert_eq!(
            one::<String>(
                "SELECT string_agg(format('%s-%s', first_seq, head_seq), ' ' ORDER BY partition)
                 FROM bussig.stream_partition JOIN bussig.stream USING (stream_id) WHERE name = 'events'"
            ),
            one::<String>(
                "SELECT string_agg(format('%s-%s', head_seq + 1, head_seq), ' ' ORDER BY partition)
                 FROM bussig.stream_partition JOIN bussig.stream USING (stream_id) WHERE name = 'events'"
            )
        );
        assert_eq!(
            one::<i64>("SELECT records FROM bussig.streams WHERE stream = 'events'"),
            Some(0)
        );
    }

    #[pg_test]
    fn append_rejects_bad_input_and_appends_nothing() {
        run("SELECT bussig.create_stream('events')");
        assert_all_fail(&[
            ("SELECT bussig.append('bad name', '1')", "22023"),
            ("SELECT bussig.append('nope', '1')", "42704"),
            ("SELECT bussig.append(NULL, '1')", "22004"),
            ("SELECT bussig.append('events', NULL)", "22004"),
            ("SELECT bussig.append('events', '1', headers => '[1]')", "22023"),
            ("SELECT bussig.append('events', '1', key => '')", "22023"),
            ("SELECT bussig.append('events', '1', key => repeat('k', 257))", "22023"),
            ("SELECT bussig.append('events', '1', subject => 'a..b')", "22023"),
            ("SELECT bussig.append('events', '1', subject => 'a.*')", "22023"),
            ("SELECT bussig.append('events', to_jsonb(repeat('x', 2000000)))", "54000"),
            ("SELECT bussig.append_batch('events', ARRAY['1', NULL]::jsonb[])", "22004"),
            ("SELECT bussig.append_batch('events', NULL)", "22004"),
            ("SELECT bussig.append_batch('events', ARRAY['1', '2']::jsonb[], subjects => ARRAY['a'])", "22023"),
            ("SELECT bussig.append_batch('events', ARRAY['1', '2']::jsonb[], keys => ARRAY['a', 'b', 'c'])", "22023"),
            ("SELECT bussig.append_batch('events', ARRAY['1']::jsonb[], keys => ARRAY[''])", "22023"),
            ("SELECT bussig.append_batch('events', ARRAY['1']::jsonb[], subjects => ARRAY['a b'])", "22023"),
            ("SELECT bussig.append_batch('events', ARRAY['1']::jsonb[], headers => '1')", "22023"),
            ("SELECT bussig.append_batch('nope', ARRAY['1']::jsonb[])", "42704"),
        ]);
        assert!(records("events", 0).is_empty());
    }

    #[pg_test]
    fn append_batch_keeps_the_order_given_within_each_key() {
        run("SELECT bussig.create_stream('events', 3)");
        assert_eq!(
            one::<i64>(
                "SELECT bussig.append_batch('events', array_agg(to_jsonb(n) ORDER BY n),
                                            keys => array_agg('k' || n % 5 ORDER BY n),
                                            subjects => array_agg('s.' || n ORDER BY n))
                 FROM generate_series(1, 100) n"
            ),
            Some(100)
        );
        assert_eq!(
            one::<i64>("SELECT bussig.append_batch('events', '{}'::jsonb[])"),
            Some(0)
        );
        // Per key, seq follows the order in the batch; every record once, numbered 1.. per partition.
        assert_eq!(
            count(
                "SELECT FROM (SELECT r.key, r.payload::int AS n,
                                     lag(r.payload::int) OVER (PARTITION BY r.key ORDER BY r.seq) AS before
                              FROM generate_series(0, 2) p, bussig.stream_range('events', p, 1, 1000) r) ordered
                 WHERE before IS NOT NULL AND before >= n"
            ),
            0
        );
        assert_eq!(
            one::<i64>(
                "SELECT sum(n)::bigint FROM (SELECT count(*) AS n, max(r.seq) AS last
                                     FROM generate_series(0, 2) p, bussig.stream_range('events', p, 1, 1000) r
                                     GROUP BY r.partition HAVING max(r.seq) = count(*)) numbered"
            ),
            Some(100)
        );
    }

    #[pg_test]
    fn privileges_on_streams_are_granted_and_checked() {
        run("SELECT bussig.create_stream('events')");
        run("SELECT bussig.create_consumer_group('events', 'g', 'earliest')");
        run("CREATE ROLE stream_user");
        let as_user = |sql: &str| format!("SET LOCAL ROLE stream_user; {sql}");
        let denied = [
            "SELECT bussig.append('events', '1')",
            "SELECT bussig.append_batch('events', ARRAY['1']::jsonb[])",
            "SELECT * FROM bussig.stream_read('events', 'g')",
            "SELECT * FROM bussig.stream_range('events', 0, 1)",
            "SELECT bussig.stream_seek('events', 'g', 0, 1)",
            "SELECT bussig.alter_stream('events', retention => '1 day')",
            "SELECT bussig.create_consumer_group('events', 'h')",
            "SELECT bussig.subscribe_stream('events', 'a.b')",
            "SELECT bussig.drop_stream('events')",
            "SELECT bussig.grant('events', 'stream_user', ARRAY['read'])",
            "SELECT bussig.create_stream('mine')",
        ];
        for sql in denied {
            assert_fails(&as_user(sql), "42501");
        }
        assert_eq!(count("SELECT FROM bussig.streams"), 1);
        run("SET LOCAL ROLE stream_user");
        assert_eq!(count("SELECT FROM bussig.streams"), 0);
        run("RESET ROLE");
        run("SELECT bussig.grant('events', 'stream_user', ARRAY['append'])");
        assert_eq!(
            sqlstate_of(&as_user("SELECT bussig.append('events', '1')")),
            None
        );
        run("RESET ROLE");
        assert_fails(
            &as_user("SELECT * FROM bussig.stream_read('events', 'g')"),
            "42501",
        );
        run("SELECT bussig.grant('events', 'stream_user', ARRAY['read'])");
        assert_eq!(
            sqlstate_of(&as_user("SELECT * FROM bussig.stream_read('events', 'g')")),
            None
        );
        run("RESET ROLE");
        assert_fails(&as_user("SELECT bussig.drop_stream('events')"), "42501");
        run("SELECT bussig.revoke('events', 'stream_user')");
        assert_fails(&as_user("SELECT bussig.append('events', '1')"), "42501");
        run("RESET ROLE");
        assert_all_fail(&[
            (
                "SELECT bussig.grant('events', 'stream_user', ARRAY['send'])",
                "22023",
            ),
            (
                "SELECT bussig.grant('events', 'stream_user', ARRAY['bogus'])",
                "22023",
            ),
            (
                "SELECT bussig.grant('events', 'no_such_role', ARRAY['read'])",
                "42704",
            ),
            (
                "SELECT bussig.grant('nothing', 'stream_user', ARRAY['read'])",
                "42704",
            ),
        ]);
        run("SELECT bussig.grant('events', 'stream_user', ARRAY['all'])");
        assert_eq!(
            one::<String>(
                "SELECT string_agg(privilege, ',' ORDER BY privilege) FROM bussig.stream_grants"
            )
            .as_deref(),
            Some("append,manage,read")
        );
        assert_eq!(
            one::<bool>("SELECT bussig.has_stream_privilege('stream_user', 'events', 'manage')"),
            Some(true)
        );
    }
}
