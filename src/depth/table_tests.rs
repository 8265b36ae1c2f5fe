//! The table's own behaviour, without a server: probing, removal, counts and their judgement.
use super::*;

/// An empty table on the heap: built on a test thread's stack it would overflow it.
fn empty() -> Box<Depths> {
    // SAFETY: all zeros is an empty table: no slot used, every count and flag zero or false.
    unsafe { Box::<Depths>::new_zeroed().assume_init() }
}

fn key(queue_id: i32) -> Key {
    Key {
        database: 5,
        relation: 16384,
        queue_id,
    }
}

#[test]
fn counts_follow_commits_and_removal_keeps_every_other_entry_reachable() {
    let mut depths = empty();
    for queue_id in 0..5000 {
        depths.created(key(queue_id));
        depths.add(key(queue_id), 1, i64::from(queue_id));
    }
    for queue_id in (0..5000).step_by(3) {
        depths.remove(key(queue_id));
    }
    for queue_id in 0..5000 {
        let expected = (queue_id % 3 != 0).then_some(i64::from(queue_id));
        assert_eq!(depths.messages(key(queue_id)), expected, "queue {queue_id}");
    }
    assert_eq!(depths.used, 5000 - 1667);
}

#[test]
fn a_nearly_full_table_with_churn_agrees_with_a_map() {
    let mut depths = empty();
    let mut model = std::collections::HashMap::new();
    let mut dice = 0x9E37_79B9_7F4A_7C15u64;
    let mut roll = |n: u64| {
        dice ^= dice << 13;
        dice ^= dice >> 7;
        dice ^= dice << 17;
        dice % n
    };
    for step in 0..400_000u64 {
        let queue_id = roll(MOST_USED as u64 + 2000) as i32;
        match roll(3) {
            0 => {
                let had_room = depths.used < MOST_USED || model.contains_key(&queue_id);
                depths.created(key(queue_id));
                if had_room {
                    model.insert(queue_id, 0i64);
                }
            }
            1 => {
                depths.remove(key(queue_id));
                model.remove(&queue_id);
            }
            _ => {
                depths.add(key(queue_id), 1, 1);
                if let Some(count) = model.get_mut(&queue_id) {
                    *count += 1;
                }
            }
        }
        assert_eq!(depths.used, model.len(), "after step {step}");
        if step % 50_000 == 0 {
            for queue_id in 0..MOST_USED as i32 + 2000 {
                assert_eq!(
                    depths.messages(key(queue_id)),
                    model.get(&queue_id).copied()
                );
            }
        }
    }
    for queue_id in 0..MOST_USED as i32 + 2000 {
        assert_eq!(
            depths.messages(key(queue_id)),
            model.get(&queue_id).copied(),
            "{queue_id}"
        );
    }
}

const SEEN_NONE: fn(u32) -> bool = |_| false;
/// No prepared transaction found, and no PREPARE since the table began.
const SETTLED: Option<u32> = Some(0);
/// Transactions 100 to 199 were running when the count's snapshot was taken.
const HORIZON: Horizon = Horizon {
    xmin: 100,
    xmax: 200,
};

#[test]
fn a_count_adds_what_committed_while_it_ran_and_a_later_count_wins() {
    let mut depths = empty();
    let first = depths.begin_count(key(1), HORIZON).unwrap();
    assert_eq!(depths.messages(key(1)), None);
    depths.add(key(1), 200, 3);
    let second = depths.begin_count(key(1), HORIZON).unwrap();
    depths.add(key(1), 201, 2);
    assert_eq!(
        depths.finish_count(key(1), first, 100, SEEN_NONE, SETTLED),
        Finished::Dropped
    );
    assert_eq!(depths.messages(key(1)), None);
    assert_eq!(
        depths.finish_count(key(1), second, 10, SEEN_NONE, SETTLED),
        Finished::Kept
    );
    assert_eq!(depths.messages(key(1)), Some(12));
}

#[test]
fn commits_are_judged_by_the_snapshot_whatever_their_number() {
    let mut depths = empty();
    let generation = depths.begin_count(key(1), HORIZON).unwrap();
    // 50 ended before the snapshot: seen. 150 was running and ended before it too, 151 after.
    depths.add(key(1), 50, 7);
    depths.add(key(1), 150, 4);
    depths.add(key(1), 151, -1);
    // Began after the snapshot: never seen, however many and however large.
    for xid in 200..1200 {
        depths.add(key(1), xid, 1);
    }
    depths.add(key(1), 1300, 1 << 40);
    depths.add(key(1), 1301, -(1 << 40));
    assert_eq!(
        depths.finish_count(key(1), generation, 10, |xid| xid == 150, SETTLED),
        Finished::Kept
    );
    assert_eq!(depths.messages(key(1)), Some(10 - 1 + 1000));
}

#[test]
fn a_count_with_more_commits_in_doubt_than_it_keeps_is_not_kept() {
    let mut depths = empty();
    let many_running = Horizon {
        xmin: 100,
        xmax: 1000,
    };
    let generation = depths.begin_count(key(1), many_running).unwrap();
    for xid in 100..100 + UNJUDGED_COMMITS as u32 + 1 {
        depths.add(key(1), xid, 1);
    }
    assert_eq!(
        depths.finish_count(key(1), generation, 10, SEEN_NONE, SETTLED),
        Finished::Dropped
    );
    assert_eq!(depths.messages(key(1)), None);
    let too_large = depths.begin_count(key(1), HORIZON).unwrap();
    depths.add(key(1), 150, 1 << 40);
    assert_eq!(
        depths.finish_count(key(1), too_large, 10, SEEN_NONE, SETTLED),
        Finished::Dropped
    );
}

#[test]
fn transaction_ids_compare_across_wraparound() {
    let mut depths = empty();
    let horizon = Horizon {
        xmin: u32::MAX - 10,
        xmax: 20,
    };
    let generation = depths.begin_count(key(1), horizon).unwrap();
    depths.add(key(1), u32::MAX - 20, 100);
    depths.add(key(1), 5, 2);
    depths.add(key(1), 30, 1);
    assert_eq!(
        depths.finish_count(key(1), generation, 0, SEEN_NONE, SETTLED),
        Finished::Kept
    );
    assert_eq!(depths.messages(key(1)), Some(3));
}

#[test]
fn more_counts_than_places_take_over_the_oldest() {
    let mut depths = empty();
    let first = depths.begin_count(key(0), HORIZON).unwrap();
    let rest: Vec<u32> = (1..=COUNTS_AT_ONCE as i32)
        .map(|queue_id| depths.begin_count(key(queue_id), HORIZON).unwrap())
        .collect();
    assert_eq!(
        depths.finish_count(key(0), first, 1, SEEN_NONE, SETTLED),
        Finished::Dropped
    );
    for (queue_id, generation) in (1..).zip(rest) {
        assert_eq!(
            depths.finish_count(key(queue_id), generation, 1, SEEN_NONE, SETTLED),
            Finished::Kept
        );
    }
    depths.remove(key(1));
    assert!(depths.counts.iter().all(|count| count.generation == 0));
}

#[test]
fn a_full_table_takes_no_more_queues_and_changes_of_unknown_queues_go_nowhere() {
    let mut depths = empty();
    for queue_id in 0..SLOTS as i32 {
        depths.created(key(queue_id));
    }
    assert_eq!(depths.used, MOST_USED);
    depths.add(key(SLOTS as i32 - 1), 1, 1);
    assert_eq!(depths.messages(key(SLOTS as i32 - 1)), None);
    assert_eq!(
        depths.uncounted(5, 16384, &[0, SLOTS as i32 - 1]),
        vec![SLOTS as i32 - 1]
    );
}

#[test]
fn touched_queues_are_taken_once_and_only_small_ones() {
    let mut depths = empty();
    depths.created(key(1));
    depths.created(key(2));
    depths.add(key(2), 1, 50);
    assert_eq!(depths.take_touched(5, 16384, 10), vec![1]);
    assert!(depths.take_touched(5, 16384, 10).is_empty());
    depths.touch(key(1));
    assert_eq!(depths.take_touched(5, 16384, 10), vec![1]);
    let elsewhere = Key {
        database: 7,
        ..key(1)
    };
    let dropped_bussig = Key {
        relation: 16000,
        ..key(3)
    };
    depths.created(elsewhere);
    depths.created(dropped_bussig);
    depths.forget_gone(5, 16384, &[5, 7]);
    assert_eq!(
        depths.messages(dropped_bussig),
        Some(0),
        "kept until seen gone twice"
    );
    depths.forget_gone(5, 16384, &[5, 7]);
    assert_eq!(depths.messages(key(1)), Some(0));
    assert_eq!(depths.messages(key(2)), Some(50));
    assert_eq!(depths.messages(elsewhere), Some(0));
    assert_eq!(depths.messages(dropped_bussig), None);
    // A database the caller did not yet know of once, then did: its queues stay.
    depths.forget_gone(5, 16384, &[5]);
    depths.forget_gone(5, 16384, &[5, 7]);
    assert_eq!(depths.messages(elsewhere), Some(0));
    depths.forget_gone(5, 16384, &[5]);
    depths.forget_gone(5, 16384, &[5]);
    assert_eq!(depths.messages(elsewhere), None);
}

#[test]
fn a_count_waits_for_commits_that_began_before_its_snapshot_and_add_after_it() {
    let mut depths = empty();
    depths.created(key(1));
    depths.created(key(2));
    // 150 began committing before the count; 160, without a slot, too; 170 after the count began.
    let early = depths.entering(key(1));
    let unslotted = depths.entering(key(9));
    let generation = depths.begin_count(key(1), HORIZON).unwrap();
    let late = depths.entering(key(1));
    assert_eq!(
        depths.finish_count(key(1), generation, 10, |xid| xid == 150, SETTLED),
        Finished::Busy
    );
    // The snapshot saw 150: its change is in the count of 10 and is not added again.
    depths.add(key(1), 150, 4);
    depths.left(key(1), early);
    assert_eq!(
        depths.finish_count(key(1), generation, 10, |xid| xid == 150, SETTLED),
        Finished::Busy,
        "the queue without a slot still commits"
    );
    depths.left(key(9), unslotted);
    assert_eq!(
        depths.finish_count(key(1), generation, 10, |xid| xid == 150, SETTLED),
        Finished::Kept,
        "a commit that began after the count's snapshot does not hold it up"
    );
    assert_eq!(depths.messages(key(1)), Some(10));
    depths.add(key(1), 170, 1);
    depths.left(key(1), late);
    assert_eq!(depths.messages(key(1)), Some(11));
    let dropped = depths.begin_count(key(2), HORIZON).unwrap();
    depths.drop_count(key(2), dropped);
    assert!(depths.counts.iter().all(|count| count.generation == 0));
}

#[test]
fn an_old_file_is_forgotten_though_other_databases_workers_look_in_between() {
    let mut depths = empty();
    let old_file = Key {
        database: 7,
        relation: 100,
        queue_id: 1,
    };
    depths.created(old_file);
    depths.forget_gone(7, 200, &[5, 7]);
    depths.forget_gone(5, 16384, &[5, 7]);
    assert_eq!(
        depths.messages(old_file),
        Some(0),
        "kept until its worker saw it gone twice"
    );
    depths.forget_gone(7, 200, &[5, 7]);
    assert_eq!(depths.messages(old_file), None);
}

#[test]
fn a_count_that_begins_right_after_another_waits_for_every_commit_in_flight() {
    let mut depths = empty();
    depths.created(key(1));
    depths.created(key(2));
    // Queue 9 has no slot: its commits are in flight with all such queues.
    let early = depths.entering(key(9));
    let first = depths.begin_count(key(1), HORIZON).unwrap();
    let second = depths.begin_count(key(2), HORIZON).unwrap();
    for (queue_id, generation) in [(1, first), (2, second)] {
        assert_eq!(
            depths.finish_count(key(queue_id), generation, 0, SEEN_NONE, SETTLED),
            Finished::Busy,
            "queue {queue_id}: a commit that began before both counts is in flight"
        );
    }
    depths.left(key(9), early);
    for (queue_id, generation) in [(1, first), (2, second)] {
        assert_eq!(
            depths.finish_count(key(queue_id), generation, 0, SEEN_NONE, SETTLED),
            Finished::Kept
        );
    }
}

#[test]
fn a_prepare_the_look_for_prepared_transactions_missed_keeps_the_queue_stale() {
    let mut depths = empty();
    depths.created(key(1));
    depths.prepared([key(1)]);
    assert_eq!(depths.uncounted(5, 16384, &[1]), vec![1]);

    // The worker found no prepared transaction, then another was prepared before its count began:
    // the count cannot see what that one will commit.
    let settled_since = Some(depths.prepares());
    depths.prepared([key(2)]);
    let generation = depths.begin_count(key(1), HORIZON).unwrap();
    assert_eq!(
        depths.finish_count(key(1), generation, 4, SEEN_NONE, settled_since),
        Finished::Kept
    );
    assert_eq!(depths.uncounted(5, 16384, &[1]), vec![1], "still in doubt");

    // With no PREPARE between the look and the count's end, the doubt goes.
    let settled_since = Some(depths.prepares());
    let generation = depths.begin_count(key(1), HORIZON).unwrap();
    assert_eq!(
        depths.finish_count(key(1), generation, 4, SEEN_NONE, settled_since),
        Finished::Kept
    );
    assert_eq!(depths.uncounted(5, 16384, &[1]), Vec::<i32>::new());

    // A count that found prepared transactions keeps the doubt.
    depths.prepared([key(1)]);
    let generation = depths.begin_count(key(1), HORIZON).unwrap();
    assert_eq!(
        depths.finish_count(key(1), generation, 4, SEEN_NONE, None),
        Finished::Kept
    );
    assert_eq!(depths.uncounted(5, 16384, &[1]), vec![1]);
}
