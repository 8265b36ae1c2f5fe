//! The counts in shared memory: a fixed table with open addressing and linear probing. Removal shifts
//! the entries after the hole back, so no tombstones pile up as ephemeral queues come and go.
//!
//! Commits add to a count under the shared lock (the count is atomic); creating, dropping and
//! counting a queue take the exclusive lock.
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};

/// Queues counted at once in the cluster, every database together.
pub const SLOTS: usize = 16_384;
/// Past three quarters full, probes grow long: further queues are counted whenever asked instead.
const MOST_USED: usize = SLOTS / 4 * 3;
/// Commits kept apart with their transaction ids after a count begins: only the first ones can end
/// before the count's snapshot, taken microseconds after the start.
const EARLY_COMMITS: usize = 8;

/// A queue of one database's bussig, in one file of its message table (`relation`: the table's
/// relfilenode). A new file (TRUNCATE, a rewrite, a bussig dropped and created again, whose queue
/// ids start over) starts every count over.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Key {
    pub database: u32,
    pub relation: u32,
    pub queue_id: i32,
}

impl Key {
    fn home(&self) -> usize {
        let mixed = (u64::from(self.database) << 32 | u64::from(self.relation))
            ^ u64::from(self.queue_id as u32).rotate_left(29);
        (mixed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SLOTS.trailing_zeros())) as usize
    }
}

#[derive(Default)]
struct Slot {
    key: Key,
    used: bool,
    /// `messages` is exact: set when the queue was created, or by a count since.
    known: bool,
    /// A prepared transaction changed the queue; its COMMIT PREPARED will not come through here.
    stale: bool,
    /// The count in progress, 0 for none. Commits meanwhile also go to `early` (the first ones, by
    /// transaction id) or `since_count` (the rest).
    generation: u32,
    messages: AtomicI64,
    since_count: AtomicI64,
    early: [EarlyCommit; EARLY_COMMITS],
    early_taken: AtomicU32,
    /// A commit changed the queue since the worker last looked.
    touched: AtomicBool,
}

/// A commit that ended soon after a count began (the count's snapshot may have seen it or not): its
/// transaction id in the high half, its change in the low. Small, as the table is built on the stack.
#[derive(Default)]
struct EarlyCommit(AtomicU64);

impl EarlyCommit {
    fn packed(xid: u32, delta: i64) -> Option<u64> {
        let delta = i32::try_from(delta).ok()?;
        Some(u64::from(xid) << 32 | u64::from(delta as u32))
    }

    fn xid_and_delta(&self) -> (u32, i64) {
        let packed = self.0.load(Ordering::Relaxed);
        ((packed >> 32) as u32, i64::from(packed as u32 as i32))
    }
}

impl Slot {
    fn take(&mut self, from: &mut Slot) {
        *self = std::mem::take(from);
    }
}

pub struct Depths {
    slots: [Slot; SLOTS],
    used: usize,
    generation: u32,
}

// SAFETY: plain data and atomics at fixed places, with no pointers, so every process can use it where
// the postmaster mapped it; the LWLock around it orders all access.
unsafe impl pgrx::PGRXSharedMemory for Depths {}
// SAFETY: all zeros is an empty table: no slot used, every count and flag zero or false.
unsafe impl crate::pg::shmem::ValidWhenZeroed for Depths {}

impl Depths {
    fn position(&self, key: Key) -> Option<usize> {
        let mut at = key.home();
        while self.slots[at].used {
            if self.slots[at].key == key {
                return Some(at);
            }
            at = (at + 1) % SLOTS;
        }
        None
    }

    fn find(&self, key: Key) -> Option<&Slot> {
        self.position(key).map(|at| &self.slots[at])
    }

    /// The queue's slot, taken now if it had none; None when the table is as full as it may get.
    fn slot(&mut self, key: Key) -> Option<&mut Slot> {
        let at = match self.position(key) {
            Some(at) => at,
            None if self.used >= MOST_USED => return None,
            None => {
                let mut at = key.home();
                while self.slots[at].used {
                    at = (at + 1) % SLOTS;
                }
                self.used += 1;
                self.slots[at] = Slot {
                    key,
                    used: true,
                    ..Slot::default()
                };
                at
            }
        };
        Some(&mut self.slots[at])
    }

    pub fn remove(&mut self, key: Key) {
        let Some(mut hole) = self.position(key) else {
            return;
        };
        let mut at = hole;
        loop {
            at = (at + 1) % SLOTS;
            if !self.slots[at].used {
                break;
            }
            // An entry moves back into the hole unless its home lies cyclically after the hole.
            let home = self.slots[at].key.home();
            let stays = if hole <= at {
                hole < home && home <= at
            } else {
                hole < home || home <= at
            };
            if !stays {
                let (low, high) = self.slots.split_at_mut(hole.max(at));
                let (target, source) = if hole < at {
                    (&mut low[hole], &mut high[0])
                } else {
                    (&mut high[0], &mut low[at])
                };
                target.take(source);
                hole = at;
            }
        }
        self.slots[hole] = Slot::default();
        self.used -= 1;
    }

    /// A queue created in a committed transaction: it starts with nothing.
    pub fn created(&mut self, key: Key) {
        if let Some(slot) = self.slot(key) {
            *slot = Slot {
                key,
                used: true,
                known: true,
                touched: AtomicBool::new(true),
                ..Slot::default()
            };
        }
    }

    /// A change of the queue's messages by `delta`, committed by transaction `xid`.
    pub fn add(&self, key: Key, xid: u32, delta: i64) {
        if let Some(slot) = self.find(key) {
            slot.messages.fetch_add(delta, Ordering::Relaxed);
            if slot.generation != 0 {
                // Entries are read under the exclusive lock, after every adder has let go.
                let taken = slot.early_taken.fetch_add(1, Ordering::Relaxed) as usize;
                let packed = EarlyCommit::packed(xid, delta);
                if let Some(early) = slot.early.get(taken) {
                    // A change too large to pack is kept as nothing, and added below.
                    early.0.store(packed.unwrap_or(0), Ordering::Relaxed);
                }
                if slot.early.get(taken).is_none() || packed.is_none() {
                    slot.since_count.fetch_add(delta, Ordering::Relaxed);
                }
            }
            slot.touched.store(true, Ordering::Relaxed);
        }
    }

    /// A committed change of the queue that leaves its number of messages as it was (a read, a nack).
    pub fn touch(&self, key: Key) {
        if let Some(slot) = self.find(key) {
            slot.touched.store(true, Ordering::Relaxed);
        }
    }

    /// How many messages the queue holds, when that is known.
    pub fn messages(&self, key: Key) -> Option<i64> {
        let slot = self.find(key).filter(|slot| slot.known)?;
        Some(slot.messages.load(Ordering::Relaxed))
    }

    pub fn mark_stale(&mut self, key: Key) {
        if let Some(at) = self.position(key) {
            self.slots[at].stale = true;
        }
    }

    /// Starts a count of the queue's messages, to be taken in a snapshot that begins after this call:
    /// commits from now on are also kept apart, and `finish_count` adds them to the count.
    pub fn begin_count(&mut self, key: Key) -> Option<u32> {
        self.generation = self.generation.checked_add(1).unwrap_or(1);
        let generation = self.generation;
        let slot = self.slot(key)?;
        slot.generation = generation;
        *slot.since_count.get_mut() = 0;
        *slot.early_taken.get_mut() = 0;
        Some(generation)
    }

    /// Ends the count `generation` began with `counted` messages; `seen` says whether the count's
    /// snapshot saw a transaction's commit. A later count of the same queue supersedes it; `settled`
    /// says that no prepared transaction can still change the queue.
    pub fn finish_count(
        &mut self,
        key: Key,
        generation: u32,
        counted: i64,
        seen: impl Fn(u32) -> bool,
        settled: bool,
    ) {
        let Some(at) = self.position(key) else {
            return;
        };
        let slot = &mut self.slots[at];
        if slot.generation == generation {
            let taken = (*slot.early_taken.get_mut() as usize).min(EARLY_COMMITS);
            let unseen: i64 = slot.early[..taken]
                .iter()
                .map(EarlyCommit::xid_and_delta)
                .filter(|&(xid, _)| !seen(xid))
                .map(|(_, delta)| delta)
                .sum();
            *slot.messages.get_mut() = counted + unseen + *slot.since_count.get_mut();
            slot.generation = 0;
            slot.known = true;
            slot.stale &= !settled;
        }
    }

    /// Those of `queue_ids` whose count is not known or may be wrong.
    pub fn uncounted(&self, database: u32, relation: u32, queue_ids: &[i32]) -> Vec<i32> {
        queue_ids
            .iter()
            .copied()
            .filter(|&queue_id| {
                let key = Key {
                    database,
                    relation,
                    queue_id,
                };
                self.find(key).is_none_or(|slot| !slot.known || slot.stale)
            })
            .collect()
    }

    /// The queues of the database that commits changed since the last call and that hold at most
    /// `most` messages; their marks are cleared.
    pub fn take_touched(&self, database: u32, relation: u32, most: i64) -> Vec<i32> {
        self.slots
            .iter()
            .filter(|slot| {
                slot.used
                    && slot.known
                    && slot.key.database == database
                    && slot.key.relation == relation
                    && slot.messages.load(Ordering::Relaxed) <= most
                    && slot.touched.swap(false, Ordering::Relaxed)
            })
            .map(|slot| slot.key.queue_id)
            .collect()
    }

    /// Forgets the database's queues counted in an older file of its message table (before a
    /// TRUNCATE, a rewrite, or a bussig dropped and created again), and those of databases not among
    /// `databases` (sorted). A dropped queue's commit
    /// removes it; one created after the caller looked must not be forgotten.
    pub fn forget_gone(&mut self, database: u32, relation: u32, databases: &[u32]) {
        let gone: Vec<Key> = self
            .slots
            .iter()
            .filter(|slot| slot.used)
            .filter(|slot| {
                if slot.key.database == database {
                    slot.key.relation != relation
                } else {
                    databases.binary_search(&slot.key.database).is_err()
                }
            })
            .map(|slot| slot.key)
            .collect();
        for key in gone {
            self.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
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

    const SEEN_NONE: fn(u32) -> bool = |_| false;

    #[test]
    fn a_count_adds_what_committed_while_it_ran_and_a_later_count_wins() {
        let mut depths = empty();
        let first = depths.begin_count(key(1)).unwrap();
        assert_eq!(depths.messages(key(1)), None);
        depths.add(key(1), 100, 3);
        let second = depths.begin_count(key(1)).unwrap();
        depths.add(key(1), 101, 2);
        depths.finish_count(key(1), first, 100, SEEN_NONE, true);
        assert_eq!(depths.messages(key(1)), None);
        depths.finish_count(key(1), second, 10, SEEN_NONE, true);
        assert_eq!(depths.messages(key(1)), Some(12));
    }

    #[test]
    fn a_commit_the_counts_snapshot_saw_is_not_added_again() {
        let mut depths = empty();
        let generation = depths.begin_count(key(1)).unwrap();
        // 200 committed before the snapshot was taken; the count of 10 holds its 4.
        depths.add(key(1), 200, 4);
        depths.add(key(1), 201, -1);
        depths.add(key(1), 202, 1 << 40);
        depths.add(key(1), 203, -(1 << 40));
        for xid in 300..320 {
            depths.add(key(1), xid, 1);
        }
        depths.finish_count(key(1), generation, 10, |xid| xid == 200, true);
        assert_eq!(depths.messages(key(1)), Some(10 - 1 + 20));
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
        assert_eq!(depths.messages(key(1)), Some(0));
        assert_eq!(depths.messages(key(2)), Some(50));
        assert_eq!(depths.messages(elsewhere), Some(0));
        assert_eq!(depths.messages(dropped_bussig), None);
        depths.forget_gone(5, 16384, &[5]);
        assert_eq!(depths.messages(elsewhere), None);
    }
}
