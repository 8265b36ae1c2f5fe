//! A waiting reader's registration: its slot in the waiter table, its sleep, and what it does with a
//! wake when it reads (see the parent module for who wakes it).
use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::pg_sys;

use super::{
    arrivals, ensure_exit_hook, hand_on, me, shared_memory, Sleeper, POLL_INTERVAL,
    READERS_WAITING, SLEEPERS,
};

/// A reader's place in the waiter table for as long as it waits; freed on drop, also when an error
/// or a cancel unwinds the wait.
pub struct Waiting {
    registered: bool,
}

impl Waiting {
    /// Registers the reader to be woken by commits that make messages arrive in `queue_id`. Its read
    /// began when the queue's arrival count was `read_from`: whether a commit came since, which the
    /// read may have missed and which found the reader not yet registered.
    pub fn register(queue_id: i32, wants: u32, read_from: u64) -> (Waiting, bool) {
        if !shared_memory() {
            return (Waiting { registered: false }, false);
        }
        ensure_exit_hook();
        {
            let mut sleepers = SLEEPERS.exclusive();
            let Some(slot) = sleepers.readers.iter_mut().find(|slot| slot.pid == 0) else {
                return (Waiting { registered: false }, false);
            };
            *slot = Sleeper {
                wants,
                ..me(queue_id)
            };
            // Before the arrival count is read, and in one order with commits, which count arrivals
            // before they look here: a commit this reader does not see counted either finds it
            // registered or has not counted yet.
            READERS_WAITING.get().fetch_add(1, Ordering::SeqCst);
        }
        let moved = arrivals::seen(queue_id) != read_from;
        (Waiting { registered: true }, moved)
    }

    /// Sleeps until woken, `timeout` passes, or an interrupt (cancel, statement_timeout, shutdown)
    /// arrives; interrupts raise their error here.
    pub fn sleep(&self, timeout: Duration) {
        let timeout = if self.registered {
            timeout
        } else {
            timeout.min(POLL_INTERVAL)
        };
        // SAFETY: waits on this process's own latch, which lives as long as the process; an ERROR
        // from WaitLatch (a failed system call) unwinds through pgrx like any other, and a dead
        // postmaster exits the process.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                // Rounded up: waking early for a delay that has not run out yet costs another round.
                timeout
                    .as_micros()
                    .div_ceil(1000)
                    .clamp(1, i64::MAX as u128) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }

    /// Clears this reader's wake: its queue, whether it had been woken, and whether a commit whose
    /// messages its read, begun at arrival count `read_from`, may have missed counted on it (woke it,
    /// or passed it by while it was woken): a reader woken by a timeout may be woken by a commit
    /// while its read is under way. With `leave`, the reader's slot is freed too.
    fn clear_wake(&self, read_from: u64, leave: bool) -> (i32, bool, bool) {
        let mut sleepers = SLEEPERS.exclusive();
        let pid = crate::pg::my_pid();
        let Some(slot) = sleepers.readers.iter_mut().find(|slot| slot.pid == pid) else {
            return (0, false, false);
        };
        let woken = slot.woken;
        let missed =
            (woken && slot.woken_at > read_from) || (slot.passed_by && slot.passed_at > read_from);
        let queue_id = slot.queue_id;
        if leave {
            *slot = Sleeper::default();
            READERS_WAITING.get().fetch_sub(1, Ordering::AcqRel);
        } else {
            slot.woken = false;
            slot.woken_at = 0;
            slot.passed_by = false;
            slot.passed_at = 0;
        }
        (queue_id, woken, missed)
    }

    /// The read after a wake, begun at arrival count `read_from`, came up empty (another reader took
    /// the messages): this reader may be woken again. True when it should read again instead of
    /// sleeping: a commit that counted on it came after its read began.
    pub fn rearm(&self, read_from: u64) -> bool {
        self.registered && self.clear_wake(read_from, false).2
    }

    /// The reader leaves with what its read, begun at arrival count `read_from`, took: a wake it had
    /// is used up. When it took a full batch, more may be ready, and when a commit that counted on it
    /// came after its read began, that commit's messages may be: either way the wake goes on to
    /// another reader of the queue (not to this one: its slot is freed first).
    pub fn done(mut self, full_batch: bool, read_from: u64) {
        if !self.registered {
            return;
        }
        self.registered = false;
        let (queue_id, woken, missed) = self.clear_wake(read_from, true);
        if (woken && full_batch) || missed {
            hand_on(queue_id);
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.registered {
            let mut sleepers = SLEEPERS.exclusive();
            let pid = crate::pg::my_pid();
            let Some(slot) = sleepers.readers.iter_mut().find(|slot| slot.pid == pid) else {
                return;
            };
            // Woken but leaving without reading (a cancel, an error): another reader reads.
            let unused_wake = (slot.woken || slot.passed_by).then_some(slot.queue_id);
            *slot = Sleeper::default();
            READERS_WAITING.get().fetch_sub(1, Ordering::AcqRel);
            drop(sleepers);
            if let Some(queue_id) = unused_wake {
                hand_on(queue_id);
            }
        }
    }
}
