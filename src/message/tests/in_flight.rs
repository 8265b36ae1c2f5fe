//! #[pg_test]s of in-flight caps: a capped queue never has more messages locked than its
//! max_in_flight, and every way a message lets go of its lock frees its slot.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::test_support::*;

    /// How many messages `read` hands out now; the deliveries are kept in temp table `got`.
    fn read_count(queue: &str, max_messages: i32) -> i64 {
        run("DROP TABLE IF EXISTS pg_temp.got");
        run(&format!(
            "CREATE TEMP TABLE got AS SELECT * FROM bussig.read('{queue}', {max_messages})"
        ));
        count("SELECT FROM got")
    }

    fn send_many(queue: &str, n: i32) {
        run(&format!(
            "SELECT bussig.send_batch('{queue}', array_agg(to_jsonb(i))) FROM generate_series(1, {n}) i"
        ));
    }

    /// Messages of `queue` locked now, as the table says.
    fn locked_in(queue: &str) -> i64 {
        count(&format!(
            "SELECT FROM bussig.message m JOIN bussig.queue q USING (queue_id)
             WHERE q.name = '{queue}' AND m.lock_token IS NOT NULL AND m.visible_at > clock_timestamp()"
        ))
    }

    #[pg_test]
    fn a_cap_must_be_positive_and_zero_removes_it() {
        assert_all_fail(&[
            (
                "SELECT bussig.create_queue('c', max_in_flight => -1)",
                "22023",
            ),
            (
                "SELECT bussig.create_queue('c', max_in_flight => 0 - 2147483647)",
                "22023",
            ),
        ]);
        assert_eq!(count("SELECT FROM bussig.queue WHERE name = 'c'"), 0);
        run("SELECT bussig.create_queue('c', max_in_flight => 3)");
        assert_eq!(
            one::<i32>("SELECT max_in_flight FROM bussig.queues WHERE queue = 'c'"),
            Some(3)
        );
        assert_eq!(count("SELECT FROM bussig.in_flight_slot"), 3);
        assert_fails(
            "SELECT bussig.alter_queue('c', max_in_flight => -5)",
            "22023",
        );
        assert_eq!(
            one::<i32>("SELECT max_in_flight FROM bussig.queues WHERE queue = 'c'"),
            Some(3),
            "a refused change leaves the cap"
        );
        run("SELECT bussig.alter_queue('c', max_deliveries => 7)");
        assert_eq!(
            count("SELECT FROM bussig.in_flight_slot"),
            3,
            "other settings leave the slots"
        );
        run("SELECT bussig.alter_queue('c', max_in_flight => 0)");
        assert_eq!(
            one::<i32>("SELECT max_in_flight FROM bussig.queues WHERE queue = 'c'"),
            None
        );
        assert_eq!(count("SELECT FROM bussig.in_flight_slot"), 0);
        run("SELECT bussig.create_queue('d', max_in_flight => 0)");
        assert_eq!(
            one::<i32>("SELECT max_in_flight FROM bussig.queues WHERE queue = 'd'"),
            None
        );
    }

    #[pg_test]
    fn reads_stop_at_the_cap_and_each_settle_frees_a_slot() {
        run("SELECT bussig.create_queue('c', max_in_flight => 3)");
        send_many("c", 10);
        assert_eq!(read_count("c", 10), 3);
        assert_eq!(read_count("c", 10), 0, "the cap is reached");
        assert_eq!(locked_in("c"), 3);
        run("SELECT bussig.ack('c', message_id, lock_token) FROM got");
        assert_eq!(read_count("c", 2), 0, "`got` was the empty read");
        assert_eq!(locked_in("c"), 3);

        // Each way out of a lock frees its slot: ack, ack_batch, nack, dead_letter.
        run("SELECT bussig.alter_queue('c', max_in_flight => 0)");
        run("SELECT bussig.purge_queue('c')");
        run("SELECT bussig.alter_queue('c', max_in_flight => 2)");
        send_many("c", 10);
        assert_eq!(read_count("c", 5), 2);
        run("SELECT bussig.ack('c', message_id, lock_token) FROM got ORDER BY message_id LIMIT 1");
        assert_eq!(read_count("c", 5), 1);
        run("SELECT bussig.ack_batch('c', array_agg(message_id), array_agg(lock_token)) FROM got");
        assert_eq!(read_count("c", 5), 1);
        run("SELECT bussig.nack('c', message_id, lock_token, delay => '1 hour') FROM got");
        assert_eq!(read_count("c", 5), 1);
        run("SELECT bussig.dead_letter('c', message_id, lock_token) FROM got");
        assert_eq!(read_count("c", 5), 1);
        assert_eq!(read_count("c", 5), 0);
        assert_eq!(locked_in("c"), 2);
        run("SELECT bussig.purge_queue('c')");
        send_many("c", 3);
        assert_eq!(
            read_count("c", 5),
            2,
            "a purge frees the slots of what it deleted"
        );
    }

    #[pg_test]
    fn ack_and_read_reads_into_the_slots_its_acks_freed() {
        run("SELECT bussig.create_queue('c', max_in_flight => 2)");
        send_many("c", 6);
        assert_eq!(read_count("c", 2), 2);
        run("DROP TABLE IF EXISTS pg_temp.again");
        run("CREATE TEMP TABLE again AS
             SELECT * FROM bussig.ack_and_read('c', (SELECT array_agg(message_id) FROM got),
                                               (SELECT array_agg(lock_token) FROM got), 5)");
        assert_eq!(count("SELECT FROM again"), 2);
        assert_eq!(locked_in("c"), 2);
    }

    #[pg_test]
    fn a_lock_that_ran_out_frees_its_slot_and_cannot_be_extended_once_taken() {
        run("SELECT bussig.create_queue('c', max_in_flight => 1)");
        send_many("c", 2);
        assert_eq!(read_count("c", 5), 1);
        run("ALTER TABLE got RENAME TO first_got");
        assert_eq!(
            one::<bool>("SELECT bussig.extend_lock('c', message_id, lock_token) FROM first_got"),
            Some(true),
            "a delivery in its slot extends"
        );
        let_time_pass("c");
        assert_eq!(
            read_count("c", 5),
            1,
            "the slot of the lock that ran out is free"
        );
        assert_eq!(
            one::<bool>("SELECT bussig.extend_lock('c', message_id, lock_token) FROM first_got"),
            Some(false),
            "its slot went to another delivery"
        );
        assert_eq!(locked_in("c"), 1);
        assert_eq!(
            one::<bool>("SELECT bussig.extend_lock('c', message_id, lock_token) FROM got"),
            Some(true)
        );
    }

    #[pg_test]
    fn a_read_rolled_back_gives_its_slots_back() {
        run("SELECT bussig.create_queue('c', max_in_flight => 3)");
        send_many("c", 5);
        run("DO $$ BEGIN
                 PERFORM * FROM bussig.read('c', 10);
                 RAISE EXCEPTION 'undo';
             EXCEPTION WHEN raise_exception THEN NULL;
             END $$");
        assert_eq!(locked_in("c"), 0);
        assert_eq!(read_count("c", 10), 3);
    }

    #[pg_test]
    fn a_new_cap_counts_what_is_locked_now() {
        run("SELECT bussig.create_queue('c')");
        send_many("c", 10);
        assert_eq!(read_count("c", 4), 4);
        run("SELECT bussig.alter_queue('c', max_in_flight => 6)");
        assert_eq!(read_count("c", 10), 2, "four of six are out");
        run("SELECT bussig.alter_queue('c', max_in_flight => 3)");
        assert_eq!(read_count("c", 10), 0, "six out, above the new cap");
        assert_eq!(
            count("SELECT FROM bussig.in_flight_slot WHERE message_id IS NOT NULL"),
            3
        );
        run("SELECT bussig.alter_queue('c', max_in_flight => 0)");
        assert_eq!(read_count("c", 10), 4, "no cap");
    }

    #[pg_test]
    fn dropping_a_capped_queue_takes_its_slots() {
        run("SELECT bussig.create_queue('c', max_in_flight => 3)");
        run("SELECT bussig.create_queue('other', max_in_flight => 2)");
        send_many("c", 5);
        assert_eq!(read_count("c", 5), 3);
        run("SELECT bussig.drop_queue('c')");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM bussig.in_flight_slot"),
            Some(2)
        );
    }

    #[pg_test]
    fn a_late_extend_lock_of_a_settled_delivery_leaves_its_slot_free() {
        run("SELECT bussig.create_queue('c', max_in_flight => 1)");
        send_many("c", 3);
        assert_eq!(read_count("c", 5), 1);
        run("ALTER TABLE got RENAME TO acked");
        run("SELECT bussig.ack('c', message_id, lock_token) FROM acked");
        assert_eq!(
            one::<bool>(
                "SELECT bussig.extend_lock('c', message_id, lock_token, '1 hour') FROM acked"
            ),
            Some(false)
        );
        assert_eq!(read_count("c", 5), 1, "the slot stayed free");
        run("ALTER TABLE got RENAME TO given_back");
        run("SELECT bussig.nack('c', message_id, lock_token, delay => '1 hour') FROM given_back");
        assert_eq!(
            one::<bool>(
                "SELECT bussig.extend_lock('c', message_id, lock_token, '1 hour') FROM given_back"
            ),
            Some(false)
        );
        assert_eq!(read_count("c", 5), 1, "the slot stayed free");
    }

    #[pg_test]
    fn a_settle_named_with_another_queue_frees_no_slot_of_either() {
        run("SELECT bussig.create_queue('a', max_in_flight => 1)");
        run("SELECT bussig.create_queue('b', max_in_flight => 1)");
        send_many("a", 2);
        send_many("b", 2);
        assert_eq!(read_count("b", 5), 1);
        for settle in [
            "bussig.nack('a', message_id, lock_token)",
            "bussig.ack('a', message_id, lock_token)",
            "bussig.dead_letter('a', message_id, lock_token)",
        ] {
            assert_eq!(
                one::<bool>(&format!("SELECT {settle} FROM got")),
                Some(false),
                "{settle}"
            );
        }
        assert_eq!(
            one::<i64>("SELECT bussig.ack_batch('a', array_agg(message_id), array_agg(lock_token)) FROM got"),
            Some(0)
        );
        run("ALTER TABLE got RENAME TO from_b");
        assert_eq!(read_count("b", 5), 0, "b's slot is still taken");
        assert_eq!(read_count("a", 5), 1);
    }
}
