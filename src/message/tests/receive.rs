//! #[pg_test]s of read and ack_and_read's reading: order, locks, dead letters on the way, positions.
//! Each runs inside one transaction, rolled back afterwards, so time does not pass within a test: lock
//! expiry and TTL are simulated by moving timestamps back.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::*;

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
        one_read_into_got("q");
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
    fn ack_and_read_does_not_wait_once_it_acknowledged() {
        one_read_into_got("q");
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

    /// A message whose shared body row is gone (deleted by hand) cannot be delivered, and must not
    /// stop its queue at it: a read moves it to the dead-letter queue (reason `body_missing`, a JSON
    /// null for payload) and delivers what follows. Peek reports it as broken data with its id.
    #[pg_test]
    fn a_message_without_its_body_is_dead_lettered_by_the_read_that_finds_it() {
        run("SELECT bussig.create_queue('q', dead_letter_queue => 'q_dlq')");
        run("INSERT INTO bussig.message (queue_id, visible_at, body_id, subject)
             SELECT queue_id, now() - interval '1 second', 424242, 'lost' FROM bussig.queue WHERE name = 'q'");
        run("SELECT bussig.send('q', '2')");
        assert_fails("SELECT * FROM bussig.peek('q')", "XX001");
        assert_eq!(
            one::<String>("SELECT string_agg(payload::text, ',') FROM bussig.read('q', 10)"),
            Some("2".into()),
            "the next message is delivered"
        );
        assert_eq!(
            one::<String>(
                "SELECT concat_ws('|', subject, payload::text, headers->>'bussig-dead-letter-reason',
                                  headers->>'bussig-dead-letter-error')
                 FROM bussig.peek('q_dlq')"
            ),
            Some("lost|null|body_missing|the body row it was published with is gone".into())
        );
        assert_eq!(count("SELECT * FROM bussig.read('q_dlq')"), 1);
    }

    /// Without a dead-letter queue, such a message is dropped, with a WARNING naming it.
    #[pg_test]
    fn a_message_without_its_body_and_no_dead_letter_queue_is_dropped() {
        run("SELECT bussig.create_queue('q')");
        run("INSERT INTO bussig.message (queue_id, visible_at, body_id)
             SELECT queue_id, now() - interval '1 second', 424242 FROM bussig.queue WHERE name = 'q'");
        run("SELECT bussig.send('q', '2')");
        assert_eq!(
            one::<String>("SELECT string_agg(payload::text, ',') FROM bussig.read('q', 10)"),
            Some("2".into())
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM bussig.message m JOIN bussig.queue q USING (queue_id) WHERE q.name = 'q'"),
            Some(1),
            "only the delivered message is left"
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
