//! #[pg_test]s of consumer groups, stream_read, stream_commit, seeking, stream_range, retention and
//! publish to streams. Each runs in one transaction, rolled back afterwards: lease expiry and the
//! passing of retention are simulated by moving timestamps back.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::*;

    /// Reads for the group into temp table `got` (partition, seq, lease_token, payload).
    fn read_into_got(stream: &str, group: &str, max: i32) -> Vec<i64> {
        run("DROP TABLE IF EXISTS pg_temp.got");
        run(&format!(
            "CREATE TEMP TABLE got AS SELECT * FROM bussig.stream_read('{stream}', '{group}', {max})"
        ));
        Spi::connect(|client| {
            client
                .select("SELECT seq FROM got ORDER BY partition, seq", None, &[])
                .unwrap()
                .map(|row| row.get::<i64>(1).unwrap().unwrap())
                .collect()
        })
    }

    fn commit_got(stream: &str, group: &str) -> bool {
        one::<bool>(&format!(
            "SELECT bool_and(bussig.stream_commit('{stream}', '{group}', partition, seq, lease_token))
             FROM (SELECT DISTINCT ON (partition) partition, seq, lease_token FROM got
                   ORDER BY partition, seq DESC) last"
        ))
        .unwrap_or(false)
    }

    fn append(stream: &str, count: i32) {
        run(&format!(
            "SELECT bussig.append('{stream}', to_jsonb(n)) FROM generate_series(1, {count}) n"
        ));
    }

    #[pg_test]
    fn a_group_reads_under_a_lease_and_commits() {
        run("SELECT bussig.create_stream('events')");
        assert_eq!(
            one::<bool>("SELECT bussig.create_consumer_group('events', 'g', 'earliest')"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.create_consumer_group('events', 'g', 'latest')"),
            Some(false)
        );
        append("events", 5);
        assert_eq!(read_into_got("events", "g", 2), [1, 2]);
        assert_eq!(count("SELECT DISTINCT lease_token FROM got"), 1);
        // The partition is leased: another member gets nothing.
        assert!(read_into_got("events", "g", 10).is_empty());
        assert_eq!(
            one::<String>(
                "SELECT format('%s %s %s', committed_seq, lag, leased_until > now())
                 FROM bussig.consumer_groups WHERE consumer_group = 'g'"
            )
            .as_deref(),
            Some("0 5 t")
        );
        run("CREATE TEMP TABLE first_lease AS SELECT lease_token FROM bussig.group_lease");
        assert_eq!(
            one::<bool>("SELECT bussig.stream_commit('events', 'g', 0, 2, (SELECT lease_token FROM first_lease))"),
            Some(true)
        );
        // The lease ended with the commit: a second commit with its token is stale.
        assert_eq!(
            one::<bool>("SELECT bussig.stream_commit('events', 'g', 0, 3, (SELECT lease_token FROM first_lease))"),
            Some(false)
        );
        assert_eq!(read_into_got("events", "g", 10), [3, 4, 5]);
        assert!(commit_got("events", "g"));
        assert!(read_into_got("events", "g", 10).is_empty());
        assert_eq!(
            one::<String>("SELECT format('%s %s %s', committed_seq, lag, coalesce(leased_until::text, '-')) FROM bussig.consumer_groups")
                .as_deref(),
            Some("5 0 -")
        );
    }

    #[pg_test]
    fn a_lease_is_extended_and_released_without_moving_the_position() {
        run("SELECT bussig.create_stream('events')");
        run("SELECT bussig.create_consumer_group('events', 'g', 'earliest')");
        append("events", 3);
        assert_eq!(read_into_got("events", "g", 2), [1, 2]);
        run("CREATE TEMP TABLE held AS SELECT DISTINCT lease_token FROM got");
        let with_held = |call: &str| {
            one::<bool>(&format!(
                "SELECT bussig.{call}('events', 'g', 0, (SELECT lease_token FROM held))"
            ))
        };
        assert_eq!(
            one::<bool>("SELECT bussig.stream_extend_lease('events', 'g', 0, (SELECT lease_token FROM held), '1 hour')"),
            Some(true)
        );
        assert_eq!(
            one::<bool>(
                "SELECT leased_until > now() + interval '50 minutes' FROM bussig.consumer_groups"
            ),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.stream_extend_lease('events', 'g', 0, gen_random_uuid())"),
            Some(false)
        );
        assert_eq!(with_held("stream_release"), Some(true));
        assert_eq!(
            one::<String>("SELECT format('%s %s', committed_seq, leased_until IS NULL) FROM bussig.consumer_groups")
                .as_deref(),
            Some("0 t")
        );
        // Read again at once, from the same position, under a new lease.
        assert_eq!(read_into_got("events", "g", 10), [1, 2, 3]);
        assert_eq!(with_held("stream_release"), Some(false));
        assert_eq!(with_held("stream_extend_lease"), Some(false));
        assert!(commit_got("events", "g"));
        // Every argument checked before the lease is looked for: any token will do.
        assert_all_fail(&[
            (
                "SELECT bussig.stream_extend_lease('events', 'g', 0, gen_random_uuid(), '0 seconds')",
                "22023",
            ),
            (
                "SELECT bussig.stream_extend_lease('events', 'g', 0, gen_random_uuid(), NULL)",
                "22004",
            ),
            ("SELECT bussig.stream_release('events', 'g', 0, NULL)", "22004"),
            (
                "SELECT bussig.stream_release('events', 'g', 1, gen_random_uuid())",
                "22023",
            ),
            (
                "SELECT bussig.stream_release('events', 'nope', 0, gen_random_uuid())",
                "42704",
            ),
            (
                "SELECT bussig.stream_extend_lease('nope', 'g', 0, gen_random_uuid())",
                "42704",
            ),
        ]);
    }

    #[pg_test]
    fn groups_are_independent_and_latest_starts_after_what_is_there() {
        run("SELECT bussig.create_stream('events', 2)");
        append("events", 6);
        run("SELECT bussig.create_consumer_group('events', 'early', 'earliest')");
        run("SELECT bussig.create_consumer_group('events', 'late')");
        assert!(read_into_got("events", "late", 100).is_empty());
        assert_eq!(read_into_got("events", "early", 100).len(), 6);
        assert!(commit_got("events", "early"));
        append("events", 4);
        assert_eq!(read_into_got("events", "late", 100).len(), 4);
        assert_eq!(read_into_got("events", "early", 100).len(), 4);
        assert_eq!(
            count("SELECT FROM got WHERE payload::int BETWEEN 1 AND 4"),
            4
        );
    }

    #[pg_test]
    fn an_expired_lease_hands_the_records_to_the_next_reader() {
        run("SELECT bussig.create_stream('events')");
        run("SELECT bussig.create_consumer_group('events', 'g', 'earliest')");
        append("events", 3);
        assert_eq!(read_into_got("events", "g", 100), [1, 2, 3]);
        run("CREATE TEMP TABLE old_lease AS SELECT DISTINCT lease_token FROM got");
        run("UPDATE bussig.group_lease SET leased_until = now() - interval '1 second'");
        assert_eq!(read_into_got("events", "g", 100), [1, 2, 3]);
        assert_eq!(
            count("SELECT FROM got JOIN old_lease USING (lease_token)"),
            0
        );
        assert_eq!(
            one::<bool>("SELECT bussig.stream_commit('events', 'g', 0, 3, (SELECT lease_token FROM old_lease))"),
            Some(false)
        );
        assert!(commit_got("events", "g"));
    }

    #[pg_test]
    fn a_group_replays_from_a_seq_and_from_a_time() {
        run("SELECT bussig.create_stream('events')");
        run("SELECT bussig.create_consumer_group('events', 'g')");
        append("events", 5);
        run("SELECT bussig.stream_seek('events', 'g', 0, 2)");
        assert_eq!(read_into_got("events", "g", 100), [2, 3, 4, 5]);
        assert!(commit_got("events", "g"));
        // Records 1-3 appended an hour ago, 4-5 now.
        run("UPDATE bussig.stream_0_0 SET appended_at = appended_at - interval '1 hour' WHERE seq <= 3"
            .replace("stream_0", &format!("stream_{}", one::<i32>("SELECT stream_id FROM bussig.stream").unwrap()))
            .as_str());
        run("SELECT bussig.stream_seek_time('events', 'g', now() - interval '30 minutes')");
        assert_eq!(read_into_got("events", "g", 100), [4, 5]);
        run("SELECT bussig.stream_seek_time('events', 'g', now() - interval '2 hours')");
        assert_eq!(read_into_got("events", "g", 100), [1, 2, 3, 4, 5]);
        // A time after every record: nothing left to read.
        run("SELECT bussig.stream_seek_time('events', 'g', now() + interval '1 hour')");
        assert!(read_into_got("events", "g", 100).is_empty());
        assert_eq!(
            one::<i64>("SELECT lag FROM bussig.consumer_groups"),
            Some(0)
        );
    }

    #[pg_test]
    fn reading_rejects_bad_input() {
        run("SELECT bussig.create_stream('events', 2)");
        run("SELECT bussig.create_consumer_group('events', 'g')");
        let token = "'00000000-0000-0000-0000-000000000000'";
        assert_all_fail(&[
            (
                "SELECT bussig.create_consumer_group('events', 'bad name')",
                "22023",
            ),
            (
                "SELECT bussig.create_consumer_group('events', 'h', 'middle')",
                "22023",
            ),
            (
                "SELECT bussig.create_consumer_group('events', 'h', NULL)",
                "22004",
            ),
            (
                "SELECT bussig.create_consumer_group('events', NULL)",
                "22004",
            ),
            ("SELECT bussig.create_consumer_group('nope', 'h')", "42704"),
            ("SELECT bussig.drop_consumer_group('nope', 'h')", "42704"),
            (
                "SELECT * FROM bussig.stream_read('events', 'nope')",
                "42704",
            ),
            ("SELECT * FROM bussig.stream_read('nope', 'g')", "42704"),
            (
                "SELECT * FROM bussig.stream_read('events', 'g', 0)",
                "22023",
            ),
            (
                "SELECT * FROM bussig.stream_read('events', 'g', 1001)",
                "22023",
            ),
            (
                "SELECT * FROM bussig.stream_read('events', 'g', NULL)",
                "22004",
            ),
            (
                "SELECT * FROM bussig.stream_read('events', 'g', wait => '-1 second')",
                "22023",
            ),
            (
                "SELECT * FROM bussig.stream_read('events', 'g', lease => '0')",
                "22023",
            ),
            (
                "SELECT * FROM bussig.stream_read('events', 'g', lease => NULL)",
                "22004",
            ),
            ("SELECT * FROM bussig.stream_read('events', '')", "22023"),
            (
                &format!("SELECT bussig.stream_commit('events', 'g', 2, 1, {token})"),
                "22023",
            ),
            (
                &format!("SELECT bussig.stream_commit('events', 'g', -1, 1, {token})"),
                "22023",
            ),
            (
                &format!("SELECT bussig.stream_commit('events', 'g', 0, 0, {token})"),
                "22023",
            ),
            (
                &format!("SELECT bussig.stream_commit('events', 'nope', 0, 1, {token})"),
                "42704",
            ),
            (
                "SELECT bussig.stream_commit('events', 'g', 0, 1, NULL)",
                "22004",
            ),
            (
                &format!("SELECT bussig.stream_commit('events', 'g', NULL, 1, {token})"),
                "22004",
            ),
            (
                &format!("SELECT bussig.stream_commit('events', 'g', 0, NULL, {token})"),
                "22004",
            ),
            ("SELECT bussig.stream_seek('events', 'g', 0, 0)", "22023"),
            // Past the next record: the group would pass over records not appended yet.
            ("SELECT bussig.stream_seek('events', 'g', 0, 2)", "22023"),
            ("SELECT bussig.stream_seek('events', 'g', 5, 1)", "22023"),
            ("SELECT bussig.stream_seek('events', 'nope', 0, 1)", "42704"),
            ("SELECT bussig.stream_seek('events', 'g', 0, NULL)", "22004"),
            (
                "SELECT bussig.stream_seek_time('events', 'g', NULL)",
                "22004",
            ),
            (
                "SELECT bussig.stream_seek_time('events', 'nope', now())",
                "42704",
            ),
            ("SELECT * FROM bussig.stream_range('events', 2, 1)", "22023"),
            ("SELECT * FROM bussig.stream_range('events', 0, 0)", "22023"),
            (
                "SELECT * FROM bussig.stream_range('events', 0, 1, 0)",
                "22023",
            ),
            (
                "SELECT * FROM bussig.stream_range('events', NULL, 1)",
                "22004",
            ),
            (
                "SELECT * FROM bussig.stream_range('events', 0, NULL)",
                "22004",
            ),
            ("SELECT * FROM bussig.stream_range('nope', 0, 1)", "42704"),
        ]);
        // A token that was never handed out commits nothing.
        assert_eq!(
            one::<bool>(&format!(
                "SELECT bussig.stream_commit('events', 'g', 0, 1, {token})"
            )),
            Some(false)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.drop_consumer_group('events', 'g')"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.drop_consumer_group('events', 'g')"),
            Some(false)
        );
        assert_eq!(count("SELECT FROM bussig.group_partition"), 0);
    }

    /// Makes the stream's current segment old enough to close, and closed ones past retention.
    fn age_segments(stream: &str) {
        run(&format!(
            "UPDATE bussig.stream_segment g
             SET opened_at = opened_at - s.retention * 2, closed_at = closed_at - s.retention * 2
             FROM bussig.stream s WHERE s.stream_id = g.stream_id AND s.name = '{stream}'"
        ));
    }

    #[pg_test]
    fn retention_by_age_empties_whole_segments_and_groups_skip_to_the_oldest_record() {
        run("SELECT bussig.create_stream('events', retention => '1 hour')");
        run("SELECT bussig.create_consumer_group('events', 'g', 'earliest')");
        append("events", 3);
        age_segments("events");
        // The first round closes the old segment; appends go to the next one.
        assert_eq!(maintenance("emptied_stream_segments"), 0);
        append("events", 2);
        assert_eq!(
            one::<i32>("SELECT current_segment FROM bussig.stream"),
            Some(1)
        );
        age_segments("events");
        assert_eq!(maintenance("emptied_stream_segments"), 1);
        let first =
            "SELECT format('%s %s', seq, payload) FROM bussig.stream_range('events', 0, 1, 1) ";
        assert_eq!(one::<String>(first).as_deref(), Some("4 1"));
        assert_eq!(
            one::<String>("SELECT format('%s %s %s', committed_seq, lag, head_seq) FROM bussig.consumer_groups")
                .as_deref(),
            Some("3 2 5")
        );
        assert_eq!(one::<i64>("SELECT records FROM bussig.streams"), Some(2));
        assert_eq!(read_into_got("events", "g", 100), [4, 5]);
        assert!(commit_got("events", "g"));
        append("events", 1);
        assert_eq!(read_into_got("events", "g", 100), [6]);
    }

    /// A record whose append read the current segment just before the switch, committed after a
    /// record of the next segment was numbered: emptying the old segment keeps that record readable
    /// to groups behind, though its seq is lower than the last one emptied.
    #[pg_test]
    fn retention_keeps_records_numbered_before_a_late_one_of_the_segment_it_empties() {
        run("SELECT bussig.create_stream('events', retention => '1 hour')");
        run("SELECT bussig.create_consumer_group('events', 'g', 'earliest')");
        append("events", 1);
        age_segments("events");
        assert_eq!(maintenance("emptied_stream_segments"), 0);
        append("events", 1);
        run("SELECT count(*) FROM bussig.stream_range('events', 0, 1, 10)");
        // The late append, into the segment closed before.
        run("DO $$ BEGIN
                 EXECUTE format('INSERT INTO bussig.stream_%s_0 (segment, partition, payload) VALUES (0, 0, %L)',
                                (SELECT stream_id FROM bussig.stream WHERE name = 'events'), '\"late\"');
             END $$");
        assert_eq!(
            one::<i64>("SELECT max(seq) FROM bussig.stream_range('events', 0, 1, 10)"),
            Some(3)
        );
        age_segments("events");
        assert_eq!(maintenance("emptied_stream_segments"), 1);
        assert_eq!(
            one::<i64>("SELECT first_seq FROM bussig.stream_partition"),
            Some(2)
        );
        assert_eq!(read_into_got("events", "g", 100), [2]);
    }

    #[pg_test]
    fn retention_by_size_empties_the_oldest_segment() {
        run("SELECT bussig.create_stream('events', retention_bytes => 200000)");
        let big = "SELECT bussig.append('events', to_jsonb(repeat('x', 1000))) FROM generate_series(1, 150)";
        // Each round closes a segment grown past half the limit; once closed ones pass the limit the
        // oldest goes.
        let mut emptied = 0;
        for _ in 0..6 {
            run(big);
            emptied += maintenance("emptied_stream_segments");
        }
        assert!(emptied >= 1, "no segment emptied");
        let first: i64 =
            one("SELECT min(seq) FROM bussig.stream_range('events', 0, 1, 1000)").unwrap();
        assert!(first > 1);
        assert_eq!(
            one::<i64>("SELECT first_seq FROM bussig.stream_partition"),
            Some(first)
        );
        // The segment closed last may take the stream past its limit until the next round empties it.
        maintenance("emptied_stream_segments");
        assert!(one::<i64>("SELECT bytes FROM bussig.streams").unwrap() <= 200_000);
        assert_eq!(
            count("SELECT FROM bussig.stream_range('events', 0, 1, 1000)"),
            0
        );
        assert_eq!(
            one::<bool>("SELECT first_seq = head_seq + 1 FROM bussig.stream_partition"),
            Some(true)
        );
    }

    #[pg_test]
    fn publish_appends_to_subscribed_streams() {
        run("SELECT bussig.create_stream('orders')");
        run("SELECT bussig.create_stream('all')");
        assert_eq!(
            one::<bool>("SELECT bussig.subscribe_stream('orders', 'orders.*')"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.subscribe_stream('orders', 'orders.*')"),
            Some(false)
        );
        run("SELECT bussig.subscribe_stream('orders', 'orders.>')");
        run("SELECT bussig.subscribe_stream('all', '>')");
        assert_eq!(
            one::<i32>("SELECT bussig.publish('orders.new', '{\"id\": 1}')"),
            Some(2)
        );
        assert_eq!(
            one::<i32>("SELECT bussig.publish('users.new', '{\"id\": 2}')"),
            Some(1)
        );
        assert_eq!(count("SELECT FROM bussig.stream_range('orders', 0, 1)"), 1);
        assert_eq!(
            one::<String>("SELECT string_agg(subject, ',' ORDER BY seq) FROM bussig.stream_range('all', 0, 1)").as_deref(),
            Some("orders.new,users.new")
        );
        assert_eq!(
            one::<bool>("SELECT bussig.unsubscribe_stream('all', '>')"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT bussig.unsubscribe_stream('all', '>')"),
            Some(false)
        );
        assert_eq!(
            one::<i32>("SELECT bussig.publish('users.new', '{}')"),
            Some(0)
        );
        assert_eq!(count("SELECT FROM bussig.stream_subscriptions"), 2);
        assert_all_fail(&[
            ("SELECT bussig.subscribe_stream('orders', 'a..b')", "22023"),
            ("SELECT bussig.subscribe_stream('orders', NULL)", "22004"),
            ("SELECT bussig.subscribe_stream('nope', 'a')", "42704"),
            ("SELECT bussig.unsubscribe_stream('nope', 'a')", "42704"),
        ]);
    }

    #[pg_test]
    fn a_publish_to_several_streams_stores_its_payload_once_until_no_record_refers_to_it() {
        run("SELECT bussig.create_stream('orders', retention => '1 hour')");
        run("SELECT bussig.create_stream('all', retention => '2 hours')");
        run("SELECT bussig.create_consumer_group('all', 'g', 'earliest')");
        run("SELECT bussig.subscribe_stream('orders', 'orders.*')");
        run("SELECT bussig.subscribe_stream('all', '>')");
        assert_eq!(
            one::<i32>("SELECT bussig.publish('orders.new', '{\"id\": 1}')"),
            Some(2)
        );
        assert_eq!(count("SELECT FROM bussig.stream_body"), 1);
        // Only the stream reached alone holds its payload.
        assert_eq!(
            one::<i32>("SELECT bussig.publish('users.new', '{\"id\": 2}')"),
            Some(1)
        );
        assert_eq!(count("SELECT FROM bussig.stream_body"), 1);
        let table = |stream: &str| {
            format!(
                "bussig.stream_{}",
                one::<i32>(&format!(
                    "SELECT stream_id FROM bussig.stream WHERE name = '{stream}'"
                ))
                .unwrap()
            )
        };
        assert_eq!(
            count(&format!(
                "SELECT FROM {} WHERE payload IS NULL AND body_id IS NOT NULL",
                table("orders")
            )),
            1
        );
        // Every way of reading gives the payload.
        assert_eq!(
            one::<String>("SELECT payload::text FROM bussig.stream_range('orders', 0, 1)")
                .as_deref(),
            Some("{\"id\": 1}")
        );
        assert_eq!(
            one::<String>("SELECT string_agg(payload::text, ',' ORDER BY seq) FROM bussig.stream_read('all', 'g')")
                .as_deref(),
            Some("{\"id\": 1},{\"id\": 2}")
        );
        // The ring moves on; the body stays while either stream keeps its record.
        run("UPDATE bussig.stream_body_ring SET switched_at = switched_at - interval '1 day'");
        assert_eq!(maintenance("emptied_body_segments"), 0);
        assert_eq!(
            one::<i32>("SELECT current_segment FROM bussig.stream_body_ring"),
            Some(1)
        );
        let emptied_records = |stream: &str| {
            let mut emptied = 0;
            for _ in 0..2 {
                age_segments(stream);
                emptied += maintenance("emptied_stream_segments");
            }
            assert_eq!(emptied, 1, "{stream}'s segment not emptied");
        };
        run("UPDATE bussig.stream_body_ring SET made_at = made_at - interval '2 hours'");
        emptied_records("orders");
        assert_eq!(maintenance("emptied_body_segments"), 0);
        assert_eq!(count("SELECT FROM bussig.stream_body"), 1);
        assert_eq!(
            one::<String>("SELECT payload::text FROM bussig.stream_range('all', 0, 1, 1)")
                .as_deref(),
            Some("{\"id\": 1}")
        );
        // In the hour after the ring was made (a restore may still be loading), no body goes.
        run("UPDATE bussig.stream_body_ring SET made_at = clock_timestamp()");
        emptied_records("all");
        assert_eq!(count("SELECT FROM bussig.stream_body"), 1);
        run("UPDATE bussig.stream_body_ring SET made_at = made_at - interval '2 hours'");
        assert_eq!(maintenance("emptied_body_segments"), 1);
        assert_eq!(count("SELECT FROM bussig.stream_body"), 0);
        // A ring without bodies stays where it is.
        run("UPDATE bussig.stream_body_ring SET switched_at = switched_at - interval '1 day'");
        assert_eq!(maintenance("emptied_body_segments"), 0);
        assert_eq!(
            one::<i32>("SELECT current_segment FROM bussig.stream_body_ring"),
            Some(1)
        );
        // New bodies go to the current segment, and read back.
        run("SELECT bussig.publish('orders.new', '3')");
        assert_eq!(count("SELECT FROM bussig.stream_body WHERE segment = 1"), 1);
        assert_eq!(
            one::<String>(
                "SELECT string_agg(payload::text, ',') FROM bussig.stream_range('orders', 0, 1)"
            )
            .as_deref(),
            Some("3")
        );
    }
}
