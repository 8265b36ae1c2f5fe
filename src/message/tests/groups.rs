//! #[pg_test]s of ordered message groups: one message of a group out at a time, in send order, while
//! other groups and ungrouped messages flow; every way a head leaves moves its group on.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::*;

    /// The payloads `read` hands out now, in delivery order, kept in temp table `got`.
    fn read_payloads(queue: &str) -> Vec<String> {
        run("DROP TABLE IF EXISTS pg_temp.got");
        run(&format!(
            "CREATE TEMP TABLE got AS SELECT * FROM bussig.read('{queue}', 100)"
        ));
        payloads_of("SELECT payload #>> '{}' FROM got ORDER BY message_id")
    }

    /// Nothing can be read now; `got` keeps the last read.
    fn assert_nothing_ready(queue: &str) {
        assert_eq!(
            count(&format!("SELECT FROM bussig.read('{queue}', 100)")),
            0
        );
    }

    fn payloads_of(sql: &str) -> Vec<String> {
        Spi::connect(|client| {
            client
                .select(sql, None, &[])
                .unwrap()
                .map(|row| row.get::<String>(1).unwrap().unwrap())
                .collect()
        })
    }

    fn ack_got(payload: &str) {
        assert_eq!(
            one::<bool>(&format!(
                "SELECT bussig.ack('g', message_id, lock_token) FROM got WHERE payload #>> '{{}}' = '{payload}'"
            )),
            Some(true)
        );
    }

    #[pg_test]
    fn a_group_delivers_one_message_at_a_time_in_send_order() {
        run("SELECT bussig.create_queue('g')");
        for (payload, group) in [
            ("a1", "'a'"),
            ("b1", "'b'"),
            ("a2", "'a'"),
            ("u1", "NULL"),
            ("a3", "'a'"),
        ] {
            run(&format!(
                "SELECT bussig.send('g', to_jsonb('{payload}'::text), group_id => {group})"
            ));
        }
        assert_eq!(read_payloads("g"), ["a1", "b1", "u1"]);
        assert_eq!(
            one::<String>("SELECT string_agg(group_id, ',' ORDER BY message_id) FROM got"),
            Some("a,b".into())
        );
        assert_nothing_ready("g");
        assert_eq!(
            one::<String>(
                "SELECT string_agg(state, ',' ORDER BY message_id) FROM bussig.peek('g')
                 WHERE group_id = 'a'"
            ),
            Some("locked,waiting_in_group,waiting_in_group".into())
        );
        ack_got("a1");
        assert_eq!(read_payloads("g"), ["a2"]);
        ack_got("a2");
        assert_eq!(read_payloads("g"), ["a3"]);
        ack_got("a3");
        assert_eq!(
            count("SELECT FROM bussig.message_group"),
            1,
            "only b is left"
        );
    }

    #[pg_test]
    fn priority_chooses_between_heads_and_never_reorders_a_group() {
        run("SELECT bussig.create_queue('g')");
        run("SELECT bussig.send('g', '\"a1\"', priority => 0, group_id => 'a')");
        run("SELECT bussig.send('g', '\"a2\"', priority => 9, group_id => 'a')");
        run("SELECT bussig.send('g', '\"b1\"', priority => 5, group_id => 'b')");
        assert_eq!(
            payloads_of("SELECT payload #>> '{}' FROM bussig.read('g', 1)"),
            ["b1"]
        );
        assert_eq!(read_payloads("g"), ["a1"]);
    }

    #[pg_test]
    fn a_delayed_retried_or_locked_head_holds_its_group_back() {
        run("SELECT bussig.create_queue('g')");
        run("SELECT bussig.send('g', '\"a1\"', delay => '1 hour', group_id => 'a')");
        run("SELECT bussig.send('g', '\"a2\"', group_id => 'a')");
        assert_nothing_ready("g");
        let blocked = "SELECT group_id || ':' || state FROM bussig.blocked_groups('g')";
        assert_eq!(one::<String>(blocked), Some("a:delayed".into()));
        // Whatever their priority; ungrouped and waiting messages are not groups' heads.
        run("SELECT bussig.send('g', '\"b1\"', delay => '1 hour', priority => 7, group_id => 'b')");
        run("SELECT bussig.send('g', '\"u\"', delay => '1 hour')");
        assert_eq!(
            one::<String>("SELECT string_agg(group_id || ':' || state, ',' ORDER BY group_id) FROM bussig.blocked_groups('g')"),
            Some("a:delayed,b:delayed".into())
        );
        run("DELETE FROM bussig.message WHERE payload IN ('\"b1\"', '\"u\"')");
        run("DELETE FROM bussig.message_group WHERE group_id = 'b'");

        let_time_pass("g");
        assert_eq!(read_payloads("g"), ["a1"]);
        assert_eq!(one::<String>(blocked), Some("a:locked".into()));
        run("SELECT bussig.nack('g', message_id, lock_token, '1 hour') FROM got");
        assert_nothing_ready("g");
        assert_eq!(one::<String>(blocked), Some("a:retry".into()));

        let_time_pass("g");
        assert_eq!(read_payloads("g"), ["a1"]);
        ack_got("a1");
        assert_eq!(count("SELECT FROM bussig.blocked_groups('g')"), 0);
        assert_eq!(read_payloads("g"), ["a2"]);
    }

    #[pg_test]
    fn a_message_behind_its_head_keeps_its_own_delay() {
        run("SELECT bussig.create_queue('g')");
        run("SELECT bussig.send('g', '\"a1\"', group_id => 'a')");
        run("SELECT bussig.send('g', '\"a2\"', delay => '1 hour', group_id => 'a')");
        assert_eq!(read_payloads("g"), ["a1"]);
        ack_got("a1");
        assert_nothing_ready("g");
        assert_eq!(
            one::<String>("SELECT state FROM bussig.blocked_groups('g')"),
            Some("delayed".into())
        );
    }

    #[pg_test]
    fn batches_group_in_array_order_and_acks_move_groups_on() {
        run("SELECT bussig.create_queue('g')");
        run("SELECT bussig.send_batch('g', ARRAY['\"x1\"', '\"y1\"', '\"x2\"', '\"u\"', '\"x3\"']::jsonb[],
                                       group_ids => ARRAY['x', 'y', 'x', NULL, 'x'])");
        assert_eq!(read_payloads("g"), ["x1", "y1", "u"]);
        run("SELECT bussig.ack_batch('g', array_agg(message_id), array_agg(lock_token)) FROM got");
        // ack_and_read hands out the next of a group whose head it acks, in the same call.
        assert_eq!(read_payloads("g"), ["x2"]);
        assert_eq!(
            payloads_of(
                "SELECT next.payload #>> '{}' FROM got,
                        LATERAL bussig.ack_and_read('g', ARRAY[got.message_id], ARRAY[got.lock_token], 10) next"
            ),
            ["x3"]
        );
        assert_eq!(messages_in("g"), 1);
    }

    #[pg_test]
    fn dead_letters_leave_their_group_and_redrive_rejoins_it() {
        run("SELECT bussig.create_queue('g')");
        run("SELECT bussig.send('g', '\"a1\"', group_id => 'a')");
        run("SELECT bussig.send('g', '\"a2\"', group_id => 'a')");
        assert_eq!(read_payloads("g"), ["a1"]);
        run("SELECT bussig.dead_letter('g', message_id, lock_token, 'poison') FROM got");
        assert_eq!(read_payloads("g"), ["a2"]);
        assert_eq!(
            one::<String>("SELECT group_id FROM bussig.peek('g_dlq')"),
            Some("a".into()),
            "the dead letter keeps its group's name"
        );
        // Back behind a2, which is still out.
        assert_eq!(one::<i64>("SELECT bussig.redrive('g')"), Some(1));
        assert_nothing_ready("g");
        run("DROP TABLE IF EXISTS pg_temp.a2");
        run(
            "CREATE TEMP TABLE a2 AS SELECT message_id, lock_token FROM bussig.peek('g') p
             JOIN bussig.message m USING (message_id) WHERE p.payload = '\"a2\"'",
        );
        run("SELECT bussig.ack('g', message_id, lock_token) FROM a2");
        assert_eq!(read_payloads("g"), ["a1"]);
    }

    #[pg_test]
    fn redriven_dead_letters_rejoin_their_group_in_send_order_whatever_their_ids() {
        run("SELECT bussig.create_queue('g')");
        for payload in ["a1", "a2", "a3"] {
            run(&format!(
                "SELECT bussig.send('g', '\"{payload}\"', group_id => 'a')"
            ));
        }
        for payload in ["a1", "a2", "a3"] {
            assert_eq!(read_payloads("g"), [payload]);
            run("SELECT bussig.dead_letter('g', message_id, lock_token, 'poison') FROM got");
        }
        // Ids come from per-backend ranges and need not follow send order: the first gets the largest.
        run("UPDATE bussig.message SET message_id = message_id + 1000000 WHERE payload = '\"a1\"'");
        assert_eq!(one::<i64>("SELECT bussig.redrive('g')"), Some(3));
        for payload in ["a1", "a2", "a3"] {
            assert_eq!(read_payloads("g"), [payload]);
            ack_got(payload);
        }
    }

    #[pg_test]
    fn an_expired_head_is_dead_lettered_and_its_group_moves_on() {
        run("SELECT bussig.create_queue('g', message_ttl => '1 hour')");
        run("SELECT bussig.send('g', '\"a1\"', group_id => 'a')");
        run("SELECT bussig.send('g', '\"a2\"', group_id => 'a')");
        run("UPDATE bussig.message SET enqueued_at = enqueued_at - interval '2 hours' WHERE payload = '\"a1\"'");
        assert_nothing_ready("g");
        assert_eq!(
            one::<String>(
                "SELECT headers ->> 'bussig-dead-letter-reason' FROM bussig.peek('g_dlq')"
            ),
            Some("expired".into())
        );
        assert_eq!(read_payloads("g"), ["a2"]);
    }

    #[pg_test]
    fn a_next_message_long_past_its_ttl_is_dead_lettered_by_the_read_that_reaches_it() {
        run("SELECT bussig.create_queue('g', message_ttl => '1 hour')");
        run("SELECT bussig.send('g', '\"a1\"', group_id => 'a')");
        run("SELECT bussig.send('g', '\"a2\"', group_id => 'a')");
        run(
            "UPDATE bussig.message SET enqueued_at = enqueued_at - interval '2 hours',
                                       group_ready_at = group_ready_at - interval '2 hours'
             WHERE payload = '\"a2\"'",
        );
        assert_eq!(read_payloads("g"), ["a1"]);
        ack_got("a1");
        assert_nothing_ready("g");
        assert_eq!(messages_in("g"), 0);
        assert_eq!(
            one::<String>(
                "SELECT headers ->> 'bussig-dead-letter-reason' FROM bussig.peek('g_dlq')"
            ),
            Some("expired".into())
        );
    }

    #[pg_test]
    fn a_duplicate_does_not_join_its_group() {
        run("SELECT bussig.create_queue('g')");
        run("SELECT bussig.send('g', '\"a1\"', dedup_id => 'k', group_id => 'a')");
        assert_eq!(
            one::<i64>("SELECT bussig.send('g', '\"a1\"', dedup_id => 'k', group_id => 'a')"),
            None
        );
        assert_eq!(
            one::<i32>("SELECT pending FROM bussig.message_group"),
            Some(1)
        );
        assert_eq!(read_payloads("g"), ["a1"]);
        ack_got("a1");
        assert_eq!(count("SELECT FROM bussig.message_group"), 0);
    }

    #[pg_test]
    fn published_messages_join_the_group_in_each_queue() {
        run("SELECT bussig.create_queue('g')");
        run("SELECT bussig.create_queue('h')");
        run("SELECT bussig.subscribe('g', 'orders.*')");
        run("SELECT bussig.subscribe('h', 'orders.*')");
        run("SELECT bussig.publish('orders.created', '\"o1\"', group_id => 'order-7')");
        run("SELECT bussig.publish('orders.paid', '\"o2\"', group_id => 'order-7')");
        assert_eq!(read_payloads("h"), ["o1"]);
        assert_eq!(read_payloads("g"), ["o1"]);
        ack_got("o1");
        assert_eq!(read_payloads("g"), ["o2"]);
    }

    #[pg_test]
    fn purge_truncate_and_drop_forget_the_groups() {
        run("SELECT bussig.create_queue('g')");
        run("SELECT bussig.send('g', '\"a1\"', group_id => 'a')");
        run("SELECT bussig.send('g', '\"a2\"', group_id => 'a')");
        run("SELECT bussig.purge_queue('g')");
        assert_eq!(count("SELECT FROM bussig.message_group"), 0);
        run("SELECT bussig.send('g', '\"a3\"', group_id => 'a')");
        assert_eq!(read_payloads("g"), ["a3"]);
        run("SELECT bussig.send('g', '\"a4\"', group_id => 'a')");
        run("TRUNCATE bussig.message");
        assert_eq!(count("SELECT FROM bussig.message_group"), 0);
        run("SELECT bussig.send('g', '\"a5\"', group_id => 'a')");
        assert_eq!(
            read_payloads("g"),
            ["a5"],
            "a group emptied by TRUNCATE starts again"
        );
        run("SELECT bussig.drop_queue('g')");
        assert_eq!(count("SELECT FROM bussig.message_group"), 0);
    }

    #[pg_test]
    fn group_arguments_are_checked() {
        run("SELECT bussig.create_queue('g')");
        let long = "x".repeat(257);
        assert_all_fail(&[
            ("SELECT bussig.send('g', '1', group_id => '')", "22023"),
            (&format!("SELECT bussig.send('g', '1', group_id => '{long}')"), "22023"),
            ("SELECT bussig.publish('a.b', '1', group_id => '')", "22023"),
            (
                "SELECT bussig.send_batch('g', ARRAY['1', '2']::jsonb[], group_ids => ARRAY['a'])",
                "22023",
            ),
            (
                "SELECT bussig.send_batch('g', ARRAY['1']::jsonb[], group_ids => ARRAY['']::text[])",
                "22023",
            ),
            ("SELECT * FROM bussig.blocked_groups(NULL)", "22004"),
            ("SELECT * FROM bussig.blocked_groups('_g')", "22023"),
            ("SELECT * FROM bussig.blocked_groups('missing')", "42704"),
        ]);
        assert_eq!(messages_in("g"), 0, "nothing half-written");
        assert_eq!(count("SELECT FROM bussig.message_group"), 0);
    }
}
