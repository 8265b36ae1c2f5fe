//! #[pg_test]s of ack, ack_batch, ack_and_read's acks, nack, extend_lock, dead_letter, redrive and peek.
//! Each runs inside one transaction, rolled back afterwards, so time does not pass within a test: lock
//! expiry and TTL are simulated by moving timestamps back.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::*;

    /// What settling the delivery in `got` with `call` (ack, nack, extend_lock) returned.
    fn settled_got(call: &str) -> Option<bool> {
        one::<bool>(&format!("SELECT bussig.{call} FROM got"))
    }

    /// Acking the delivery in `got` through `queue` finds nothing to ack, and `left` messages stay in q.
    fn assert_nothing_acked(queue: &str, left: i64) {
        let ack = format!("ack('{queue}', message_id, lock_token)");
        assert_eq!(settled_got(&ack), Some(false));
        assert_eq!(messages_in("q"), left);
    }

    #[pg_test]
    fn ack_removes_only_with_the_latest_token() {
        one_read_into_got("q");
        assert_eq!(
            settled_got("ack('q', message_id, gen_random_uuid())"),
            Some(false)
        );
        assert_eq!(settled_got("ack('q', message_id, lock_token)"), Some(true));
        assert_nothing_acked("q", 0);
    }

    #[pg_test]
    fn ack_rejects_bad_input() {
        one_read_into_got("q");
        run("SELECT bussig.create_queue('p')");
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
        assert_nothing_acked("p", 1);
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
    fn nack_gives_back_with_backoff_or_delay() {
        run("SELECT bussig.create_queue('q', retry_delay => '10 seconds', retry_multiplier => 3, retry_delay_max => '1 minute')");
        run("SELECT bussig.send('q', '1')");
        read_into_got("q");
        assert_eq!(
            settled_got("nack('q', message_id, lock_token, error => 'e1')"),
            Some(true)
        );
        assert_eq!(
            one::<String>("SELECT format('%s %s %s', state, date_trunc('second', visible_at - now()), delivery_count) FROM bussig.peek('q')").as_deref(),
            Some("delayed 00:00:10 1")
        );
        // A nacked delivery is settled: its token no longer acks.
        assert_eq!(settled_got("ack('q', message_id, lock_token)"), Some(false));
        assert_eq!(
            settled_got("nack('q', message_id, lock_token)"),
            Some(false)
        );
        // Each retry waits retry_multiplier times longer, up to retry_delay_max.
        for backoff in ["00:00:30", "00:01:00"] {
            let_time_pass("q");
            read_into_got("q");
            run("SELECT bussig.nack('q', message_id, lock_token) FROM got");
            assert_eq!(
                one::<String>(
                    "SELECT date_trunc('second', visible_at - now())::text FROM bussig.peek('q')"
                )
                .as_deref(),
                Some(backoff)
            );
        }
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
            settled_got("nack('q', message_id, lock_token, error => 'boom')"),
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
            settled_got("extend_lock('q', message_id, lock_token, '1 hour')"),
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
            settled_got("extend_lock('q', message_id, lock_token)"),
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
            settled_got("extend_lock('q', message_id, gen_random_uuid())"),
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
            settled_got("dead_letter('q', message_id, gen_random_uuid())"),
            Some(false)
        );
        assert_eq!(
            settled_got("dead_letter('q', message_id, lock_token, 'poison', 'bad field')"),
            Some(true)
        );
        assert_eq!(
            settled_got("dead_letter('q', message_id, lock_token)"),
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
    fn reply_acks_the_request_and_answers_with_its_correlation() {
        run("SELECT bussig.create_queue('requests')");
        run("SELECT bussig.create_queue('replies')");
        run("SELECT bussig.send('requests', '1', reply_to => 'replies')");
        read_into_got("requests");
        let reply = one::<i64>(
            "SELECT bussig.reply('requests', message_id, lock_token, '{\"answer\": 1}') FROM got",
        );
        assert!(reply.is_some());
        assert_eq!(messages_in("requests"), 0);
        assert_eq!(
            one::<bool>(
                "SELECT r.correlation_id = got.message_id::text AND r.payload = '{\"answer\": 1}'
                 FROM bussig.message r, got WHERE r.message_id = (SELECT max(message_id) FROM bussig.message)"
            ),
            Some(true)
        );
        // A stale token sends and acks nothing.
        assert_eq!(
            one::<i64>("SELECT bussig.reply('requests', message_id, lock_token, '2') FROM got"),
            None
        );
        assert_eq!(messages_in("replies"), 1);
        // The request's own correlation id is kept, and headers go with the reply.
        run("SELECT bussig.send('requests', '2', reply_to => 'replies', correlation_id => 'c-2')");
        read_into_got("requests");
        run("SELECT bussig.reply('requests', message_id, lock_token, '3', '{\"h\": \"v\"}') FROM got");
        assert_eq!(
            one::<String>(
                "SELECT correlation_id || ' ' || (headers ->> 'h') FROM bussig.message m
                 JOIN bussig.queue q USING (queue_id) WHERE q.name = 'replies' AND correlation_id = 'c-2'"
            )
            .as_deref(),
            Some("c-2 v")
        );
    }

    #[pg_test]
    fn reply_refuses_requests_it_cannot_answer_and_acks_nothing() {
        run("SELECT bussig.create_queue('requests')");
        run("SELECT bussig.send('requests', '1')");
        read_into_got("requests");
        assert_all_fail(&[
            (
                "SELECT bussig.reply('requests', message_id, lock_token, '1') FROM got",
                "55000",
            ),
            (
                "SELECT bussig.reply(NULL, message_id, lock_token, '1') FROM got",
                "22004",
            ),
            (
                "SELECT bussig.reply('requests', NULL, lock_token, '1') FROM got",
                "22004",
            ),
            (
                "SELECT bussig.reply('requests', message_id, NULL, '1') FROM got",
                "22004",
            ),
            (
                "SELECT bussig.reply('requests', message_id, lock_token, NULL) FROM got",
                "22004",
            ),
            (
                "SELECT bussig.reply('requests', message_id, lock_token, '1', '[1]') FROM got",
                "22023",
            ),
            (
                "SELECT bussig.reply('bad name', message_id, lock_token, '1') FROM got",
                "22023",
            ),
            (
                "SELECT bussig.reply('missing', message_id, lock_token, '1') FROM got",
                "42704",
            ),
        ]);
        assert_eq!(messages_in("requests"), 1);
        // A reply_to queue that does not exist: 42704, and the request stays.
        run("SELECT bussig.send('requests', '2', reply_to => 'gone')");
        run("DELETE FROM bussig.message WHERE payload = '1'");
        read_into_got("requests");
        assert_fails(
            "SELECT bussig.reply('requests', message_id, lock_token, '1') FROM got",
            "42704",
        );
        assert_eq!(messages_in("requests"), 1);
        assert_eq!(
            settled_got("ack('requests', message_id, lock_token)"),
            Some(true)
        );
    }
}
