//! The counts in shared memory: a fixed table with open addressing and linear probing. Removal shifts
//! the entries after the hole back, so no tombstones pile up as ephemeral queues come and go.
//!
//! Commits add to a count under the shared lock (the count is atomic); creating, dropping and
//! counting a queue take the exclusive lock.
//!
//! A count of the rows runs in a snapshot taken under the exclusive lock as the count begins. A
//! commit is visible before its callback adds to the count, so a commit that adds after the count
//! began may be in the count's snapshot or not. Its transaction id says which: below the snapshot's
//! xmin it was seen, at or past its xmax it was not, and in between (transactions running when the
//! snapshot was taken, or ended whose callback had not run) it is kept with its change and judged
//! against the snapshot at the end. Those in between are about as many as the transactions that
//! commit to the queue at once (each commit adds once per queue); should more come than a count has
//! room for, the count is spoiled and not kept, never wrong. And a commit visible to the snapshot
//! may add only after the count ended: commits are noted in flight from their pre-commit (before
//! anyone can see them) until they add, and a count is kept only once those that began before its
//! snapshot have added (`InFlight`).
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};

use crate::pg::snapshot::Horizon;

/// Queues counted at once in the cluster, every database together.
pub const SLOTS: usize = 16_384;
/// Past three quarters full, probes grow long: further queues are counted whenever asked instead.
const MOST_USED: usize = SLOTS / 4 * 3;
/// Counts of rows in progress at once, in the whole cluster; one more takes over the oldest.
pub const COUNTS_AT_ONCE: usize = 16;
/// Commits a count keeps with their transaction ids: those of transactions running when its
/// snapshot was taken.
const UNJUDGED_COMMITS: usize = 256;

/// `a` came before `b`, modulo 2^32 as PostgreSQL compares normal transaction ids.
fn precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

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
    /// The last look of its own database's worker found the queue's file replaced (`forget_gone`).
    /// It is forgotten only when the next look finds so again: what a worker read of the catalog may
    /// predate a file made just before the queue was.
    file_seems_gone: bool,
    /// The last look of another database's worker found the queue's database gone; as above.
    database_seems_gone: bool,
    /// The count in progress: its place in `Depths::counts`, plus one; 0 for none.
    count: u8,
    /// Committing transactions that changed the queue and have not added their change yet, by the
    /// epoch they began committing in; a count flips the epoch as it begins.
    in_flight: InFlight,
    messages: AtomicI64,
    /// A commit changed the queue since the worker last looked.
    touched: AtomicBool,
}

/// Transactions between their pre-commit (before others can see them) and the hook that adds their
/// change (after): a count's snapshot may have seen them, and their change comes later. A count is
/// kept only once every one that began committing before its snapshot has added, which it then judged.
#[derive(Default)]
struct InFlight {
    epoch: bool,
    committing: [AtomicU32; 2],
}

impl InFlight {
    fn enter(&self) -> bool {
        self.committing[usize::from(self.epoch)].fetch_add(1, Ordering::Relaxed);
        self.epoch
    }

    fn leave(&self, epoch: bool) {
        let committing = &self.committing[usize::from(epoch)];
        // Saturating: a slot made anew between a transaction's pre-commit and its commit has none.
        let _ = committing.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// A count begins: what it must wait for. Transactions that entered before go on in the
    /// current epoch; when the other one has no transaction left, later ones enter there, and the
    /// count waits for the current epoch only. Otherwise (another count switched epochs a moment
    /// ago) the epochs stay as they are, and the count waits for both.
    fn begin_count(&mut self) -> Before {
        let other = !self.epoch;
        if self.committing[usize::from(other)].load(Ordering::Relaxed) == 0 {
            let before = self.epoch;
            self.epoch = other;
            Before::Epoch(before)
        } else {
            Before::Both
        }
    }

    fn settled(&self, before: Before) -> bool {
        let empty = |epoch: bool| self.committing[usize::from(epoch)].load(Ordering::Relaxed) == 0;
        match before {
            Before::Epoch(epoch) => empty(epoch),
            Before::Both => empty(false) && empty(true),
        }
    }
}

/// The in-flight commits a count waits for: those of one epoch, or all. A defined layout, as it
/// lives in zeroed shared memory: all zeros is `Epoch(false)`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(u8)]
enum Before {
    Epoch(bool),
    #[default]
    Both,
}

/// Where a committing transaction was noted as in flight for one queue.
#[derive(Clone, Copy, Debug)]
pub enum Entered {
    Slot(bool),
    /// The queue had no slot: noted with all such queues.
    Unslotted(bool),
}

/// How `finish_count` ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Finished {
    Kept,
    /// Superseded, taken over or spoiled: the count is not kept.
    Dropped,
    /// A transaction that began committing before the count's snapshot has not added its change yet:
    /// try again in a moment.
    Busy,
}

/// A count of one queue's rows in progress, and the commits that came while it ran.
struct Count {
    /// Which count this is; 0 when the place is free.
    generation: u32,
    /// The epochs of in-flight commits (the queue's, and those of queues without a slot) that
    /// began before the count's snapshot.
    epochs_before: (Before, Before),
    /// The queue counted.
    key: Key,
    horizon: Horizon,
    /// Changes of commits the count's snapshot cannot have seen.
    unseen: AtomicI64,
    unjudged: [UnjudgedCommit; UNJUDGED_COMMITS],
    unjudged_taken: AtomicU32,
    /// More commits came in doubt than there is room for, or a change too large to keep.
    spoiled: AtomicBool,
}

impl Count {
    fn start(&mut self, generation: u32, key: Key, horizon: Horizon) {
        self.generation = generation;
        self.key = key;
        self.horizon = horizon;
        *self.unseen.get_mut() = 0;
        *self.unjudged_taken.get_mut() = 0;
        *self.spoiled.get_mut() = false;
    }

    fn note(&self, xid: u32, delta: i64) {
        let horizon = self.horizon;
        if precedes(xid, horizon.xmin) {
            return;
        }
        if !precedes(xid, horizon.xmax) {
            self.unseen.fetch_add(delta, Ordering::Relaxed);
            return;
        }
        // Entries are read under the exclusive lock, after every adder has let go.
        let taken = self.unjudged_taken.fetch_add(1, Ordering::Relaxed) as usize;
        match (self.unjudged.get(taken), UnjudgedCommit::packed(xid, delta)) {
            (Some(entry), Some(packed)) => entry.0.store(packed, Ordering::Relaxed),
            _ => self.spoiled.store(true, Ordering::Relaxed),
        }
    }

    /// What commits during the count changed that its snapshot did not see; None when spoiled.
    fn missed(&mut self, seen: impl Fn(u32) -> bool) -> Option<i64> {
        if *self.spoiled.get_mut() {
            return None;
        }
        let taken = *self.unjudged_taken.get_mut() as usize;
        let unjudged: i64 = self.unjudged[..taken]
            .iter()
            .map(UnjudgedCommit::xid_and_delta)
            .filter(|&(xid, _)| !seen(xid))
            .map(|(_, delta)| delta)
            .sum();
        Some(unjudged + *self.unseen.get_mut())
    }
}

/// A commit of a transaction that was running when a count's snapshot was taken: its transaction
/// id in the high half, its change in the low.
#[derive(Default)]
struct UnjudgedCommit(AtomicU64);

impl UnjudgedCommit {
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
    counts: [Count; COUNTS_AT_ONCE],
    /// In-flight commits of queues that had no slot when they began committing.
    unslotted_in_flight: InFlight,
    /// PREPAREs that changed counted queues so far (wrapping): a count over which it moved cannot say
    /// that no prepared transaction is left to change its queue.
    prepares: u32,
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
        self.abandon_count(hole);
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
        if let Some(at) = self.position(key) {
            self.abandon_count(at);
        }
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
            if let Some(count) = usize::from(slot.count).checked_sub(1) {
                self.counts[count].note(xid, delta);
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

    /// A transaction that changed these queues was prepared: COMMIT PREPARED will come from another
    /// session, without the changes, so the queues are counted again once no prepared transaction is
    /// left.
    pub fn prepared(&mut self, keys: impl IntoIterator<Item = Key>) {
        self.prepares = self.prepares.wrapping_add(1);
        for key in keys {
            // A queue not counted yet gets its slot now, stale: a first count taken before the
            // COMMIT PREPARED (which does not come through here) would otherwise be kept as exact.
            if let Some(slot) = self.slot(key) {
                slot.stale = true;
            }
        }
    }

    /// How many PREPAREs `prepared` has seen (wrapping): see `finish_count`.
    pub fn prepares(&self) -> u32 {
        self.prepares
    }

    /// Starts a count of the queue's messages in a snapshot the caller takes before letting go of
    /// the exclusive lock, and whose range in doubt is `horizon`: commits from now on are noted, and
    /// `finish_count` adds those the snapshot did not see. A count started again supersedes this one.
    pub fn begin_count(&mut self, key: Key, horizon: Horizon) -> Option<u32> {
        self.generation = self.generation.checked_add(1).unwrap_or(1);
        let generation = self.generation;
        let at = self.position(key).or_else(|| {
            self.slot(key)?;
            self.position(key)
        })?;
        self.abandon_count(at);
        // A free place, or the oldest count's: one whose backend failed before finishing leaves it.
        let place = (0..COUNTS_AT_ONCE)
            .min_by_key(|&place| match self.counts[place].generation {
                0 => 0,
                older => 1 + u64::from(u32::MAX - generation.wrapping_sub(older)),
            })
            .expect("at least one count place");
        if self.counts[place].generation != 0 {
            if let Some(owner) = self.position(self.counts[place].key) {
                self.abandon_count(owner);
            }
        }
        self.counts[place].start(generation, key, horizon);
        self.counts[place].epochs_before = (
            self.slots[at].in_flight.begin_count(),
            self.unslotted_in_flight.begin_count(),
        );
        self.slots[at].count = (place + 1) as u8;
        Some(generation)
    }

    /// Ends the count `generation` began with `counted` messages; `seen` says whether the count's
    /// snapshot saw a transaction's commit. A later count of the same queue supersedes it, and a
    /// spoiled one leaves the queue uncounted. `settled_since` is `prepares()` as it was before the
    /// caller found no prepared transaction, ahead of the count's snapshot: when no PREPARE came since,
    /// none can still change the queue, and its stale mark goes. Whether the count was kept.
    pub fn finish_count(
        &mut self,
        key: Key,
        generation: u32,
        counted: i64,
        seen: impl Fn(u32) -> bool,
        settled_since: Option<u32>,
    ) -> Finished {
        let Some(at) = self.position(key) else {
            return Finished::Dropped;
        };
        let Some(place) = usize::from(self.slots[at].count).checked_sub(1) else {
            return Finished::Dropped;
        };
        if self.counts[place].generation != generation {
            return Finished::Dropped;
        }
        let (slot_before, unslotted_before) = self.counts[place].epochs_before;
        if !self.slots[at].in_flight.settled(slot_before)
            || !self.unslotted_in_flight.settled(unslotted_before)
        {
            return Finished::Busy;
        }
        let missed = self.counts[place].missed(seen);
        self.abandon_count(at);
        let Some(missed) = missed else {
            return Finished::Dropped;
        };
        let settled = settled_since == Some(self.prepares);
        let slot = &mut self.slots[at];
        *slot.messages.get_mut() = counted + missed;
        slot.known = true;
        slot.stale &= !settled;
        Finished::Kept
    }

    /// A transaction that changed the queue's messages begins to commit: noted as in flight until
    /// `add` (or `left` at its abort).
    pub fn entering(&self, key: Key) -> Entered {
        match self.find(key) {
            Some(slot) => Entered::Slot(slot.in_flight.enter()),
            None => Entered::Unslotted(self.unslotted_in_flight.enter()),
        }
    }

    /// The transaction `entering` noted added its change, or aborted.
    pub fn left(&self, key: Key, entered: Entered) {
        match entered {
            Entered::Slot(epoch) => {
                if let Some(slot) = self.find(key) {
                    slot.in_flight.leave(epoch);
                }
            }
            Entered::Unslotted(epoch) => self.unslotted_in_flight.leave(epoch),
        }
    }

    /// Gives up the count `generation` of the queue, if it is still in progress.
    pub fn drop_count(&mut self, key: Key, generation: u32) {
        let Some(at) = self.position(key) else {
            return;
        };
        let owned = usize::from(self.slots[at].count)
            .checked_sub(1)
            .is_some_and(|place| self.counts[place].generation == generation);
        if owned {
            self.abandon_count(at);
        }
    }

    /// Frees the place of the count in progress for the slot at `at`, if any.
    fn abandon_count(&mut self, at: usize) {
        if let Some(place) = usize::from(self.slots[at].count).checked_sub(1) {
            self.counts[place].generation = 0;
            self.slots[at].count = 0;
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
        let mut gone = Vec::new();
        for slot in self.slots.iter_mut().filter(|slot| slot.used) {
            // Each verdict has its own mark, so that workers of other databases do not clear it.
            let (now, before) = if slot.key.database == database {
                (slot.key.relation != relation, &mut slot.file_seems_gone)
            } else {
                let missing = databases.binary_search(&slot.key.database).is_err();
                (missing, &mut slot.database_seems_gone)
            };
            if now && *before {
                gone.push(slot.key);
            }
            *before = now;
        }
        for key in gone {
            self.remove(key);
        }
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
