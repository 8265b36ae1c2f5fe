//! Snapshots taken on purpose: a count that must see every commit up to now, and know which.
use pgrx::pg_sys;

/// The range of transaction ids a snapshot leaves in doubt: below `xmin` every one had ended when it
/// was taken, and from `xmax` on none had ended (they had not begun, or were running).
#[derive(Clone, Copy, Debug, Default)]
pub struct Horizon {
    pub xmin: u32,
    pub xmax: u32,
}

/// The latest snapshot of the whole cluster, registered until dropped.
pub struct LatestSnapshot(pg_sys::Snapshot);

impl LatestSnapshot {
    pub fn take() -> Self {
        // SAFETY: inside a transaction; the copy is registered with the transaction's resource owner,
        // so an error before `drop` releases it too.
        LatestSnapshot(unsafe { pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot()) })
    }

    /// Whether the snapshot sees what `xid` committed: a committed transaction it does not list as
    /// running is in it.
    pub fn saw(&self, xid: u32) -> bool {
        // SAFETY: the snapshot is registered, so it lives until `drop`.
        !unsafe { pg_sys::XidInMVCCSnapshot(xid.into(), self.0) }
    }

    /// The transaction ids the snapshot leaves in doubt.
    pub fn horizon(&self) -> Horizon {
        // SAFETY: the snapshot is registered, so it lives until `drop`.
        let snapshot = unsafe { &*self.0 };
        Horizon {
            xmin: snapshot.xmin.into_inner(),
            xmax: snapshot.xmax.into_inner(),
        }
    }

    /// Runs `work` with this snapshot as the active one: read-only SPI statements read in it.
    pub fn while_active<R>(&self, work: impl FnOnce() -> R) -> R {
        // SAFETY: the snapshot is registered; it is popped below, or by the abort of an error.
        unsafe { pg_sys::PushActiveSnapshot(self.0) };
        let result = work();
        // SAFETY: pushed above; `work` returns here with the stack as it found it.
        unsafe { pg_sys::PopActiveSnapshot() };
        result
    }
}

impl Drop for LatestSnapshot {
    fn drop(&mut self) {
        // SAFETY: registered by `take`, unregistered once. When an error unwinds through here the
        // snapshot may still be on the active stack: that keeps it alive until the abort clears it.
        unsafe { pg_sys::UnregisterSnapshot(self.0) }
    }
}
