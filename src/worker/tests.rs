//! #[pg_test]s of the worker's steps, run through run_maintenance(): the test server does not preload
//! bussig, so no worker runs beside them.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::*;

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

        // A body goes only once nothing has referred to it for a minute, and not in the hour after
        // the extension was made (a restore loads bodies a while before the messages).
        run("SELECT bussig.subscribe('a', 'x'), bussig.subscribe('b', 'x')");
        run("SELECT bussig.publish('x', '\"shared\"')");
        run("INSERT INTO bussig.body (payload) VALUES ('\"unused\"')");
        let marks_age =
            "UPDATE bussig.body SET unreferenced_since = unreferenced_since - interval '2 minutes'";
        assert_eq!(maintenance("collected_bodies"), 0);
        run(marks_age);
        assert_eq!(
            maintenance("collected_bodies"),
            0,
            "collected in the first hour"
        );
        run("UPDATE bussig.stream_body_ring SET made_at = made_at - interval '2 hours'");
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

        // A message a send committed for a queue that was dropped meanwhile goes once no transaction
        // older than the worker's notice of the drop is left; a message whose queue is only missing (a
        // restore loads messages first) stays. A drop of this very transaction is not noticed (its
        // transaction has not ended); a notice of a day ago, before every other test began, stands in
        // for the round that noticed it (tests/maintenance_calls.rs runs the rounds for real).
        run("SELECT bussig.create_queue('doomed')");
        let doomed = one::<i32>("SELECT queue_id FROM bussig.queue WHERE name = 'doomed'").unwrap();
        run("SELECT bussig.drop_queue('doomed')");
        run(&format!("INSERT INTO bussig.message (queue_id, visible_at, payload) VALUES ({doomed}, now(), '1')"));
        run("INSERT INTO bussig.message (queue_id, visible_at, payload) VALUES (-1, now(), '1')");
        assert_eq!(maintenance("removed_orphans"), 0);
        assert_eq!(
            count(&format!(
                "SELECT FROM bussig.dropped_queue WHERE queue_id = {doomed} AND noticed_at IS NULL"
            )),
            1,
            "a drop noticed before its transaction ended"
        );
        run("UPDATE bussig.dropped_queue SET noticed_at = now() - interval '1 day'");
        assert_eq!(maintenance("removed_orphans"), 1);
        assert_eq!(
            count(&format!(
                "SELECT FROM bussig.dropped_queue WHERE queue_id = {doomed}"
            )),
            0,
            "the drop stayed recorded"
        );
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
        // Queue -7, dropped since the publish, is skipped.
        run("INSERT INTO bussig.dropped_queue (queue_id) VALUES (-7)");
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

    /// A fan-out to a queue missing though no drop recorded it waits in the hour after the extension
    /// was made (a restore that loaded bussig.fanout before bussig.queue); after that hour the queue
    /// counts as gone and is skipped.
    #[pg_test]
    fn a_fan_out_to_a_queue_not_restored_yet_waits() {
        run("SELECT bussig.create_queue('there')");
        run("WITH body AS (INSERT INTO bussig.body (payload) VALUES ('\"later\"') RETURNING body_id)
             INSERT INTO bussig.fanout (body_id, queue_ids, subject, visible_at, enqueued_at, priority)
             SELECT body_id, ARRAY[(SELECT queue_id FROM bussig.queue WHERE name = 'there'), -8],
                    'later', now(), now(), 0
             FROM body");
        assert_eq!(maintenance("fanned_out"), 0);
        assert_eq!(count("SELECT FROM bussig.fanout"), 1, "the fan-out went");
        run("UPDATE bussig.stream_body_ring SET made_at = made_at - interval '2 hours'");
        assert_eq!(maintenance("fanned_out"), 1);
        assert_eq!(count("SELECT FROM bussig.fanout"), 0);
        assert_eq!(messages_in("there"), 1);
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
}
