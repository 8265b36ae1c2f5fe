//! A table in shared memory behind an LWLock, set up zeroed in place. pgrx's `PgLwLock` builds its
//! value on the postmaster's stack and copies it in; the depth table is megabytes, more than that stack
//! holds in a debug build.
use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::ops::{Deref, DerefMut};

use pgrx::{pg_guard, pg_sys, PGRXSharedMemory};

/// # Safety
/// All bytes zero must be a valid, empty value of the type.
pub unsafe trait ValidWhenZeroed: PGRXSharedMemory {}

pub struct ZeroedLwLock<T> {
    name: &'static CStr,
    shared: UnsafeCell<*mut Shared<T>>,
}

#[repr(C)]
struct Shared<T> {
    lock: *mut pg_sys::LWLock,
    data: UnsafeCell<T>,
}

// SAFETY: the pointer is set once, by the postmaster before it forks, and read only after; the data
// behind it is only reached through the LWLock.
unsafe impl<T: ValidWhenZeroed> Sync for ZeroedLwLock<T> {}

impl<T: ValidWhenZeroed> ZeroedLwLock<T> {
    pub const fn new(name: &'static CStr) -> Self {
        ZeroedLwLock {
            name,
            shared: UnsafeCell::new(std::ptr::null_mut()),
        }
    }

    fn shared(&self) -> &Shared<T> {
        // SAFETY: written once at shared memory startup, before any backend exists.
        let shared = unsafe { *self.shared.get() };
        // SAFETY: null or a pointer into shared memory that lives as long as the process.
        unsafe { shared.as_ref() }.expect("shared memory set up by _PG_init")
    }

    pub fn share(&self) -> Guard<'_, T> {
        self.lock(pg_sys::LWLockMode::LW_SHARED)
    }

    pub fn exclusive(&self) -> GuardMut<'_, T> {
        GuardMut(self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE))
    }

    fn lock(&self, mode: pg_sys::LWLockMode::Type) -> Guard<'_, T> {
        let shared = self.shared();
        // SAFETY: the lock is PostgreSQL's, set up with the table; an error releases it at abort.
        unsafe { pg_sys::LWLockAcquire(shared.lock, mode) };
        Guard { shared }
    }

    /// Asks for the space and the lock; call from _PG_init while preloading.
    ///
    /// # Safety
    /// Call once in the process, for one lock only: the hooks keep its place in statics of their own.
    pub unsafe fn request(&'static self) {
        static mut NAME: *const std::ffi::c_char = std::ptr::null();
        static mut SIZE: usize = 0;
        static mut PLACE: *mut *mut () = std::ptr::null_mut();
        static mut PREVIOUS_REQUEST: pg_sys::shmem_request_hook_type = None;
        static mut PREVIOUS_STARTUP: pg_sys::shmem_startup_hook_type = None;

        #[pg_guard]
        unsafe extern "C-unwind" fn on_request() {
            // SAFETY: the postmaster runs its hooks one at a time, after `request` set the statics.
            unsafe {
                if let Some(previous) = PREVIOUS_REQUEST {
                    previous();
                }
                pg_sys::RequestAddinShmemSpace(SIZE);
                pg_sys::RequestNamedLWLockTranche(NAME, 1);
            }
        }

        #[pg_guard]
        unsafe extern "C-unwind" fn on_startup() {
            // SAFETY: as above; the add-in lock (the 22nd of the main array, as PostgreSQL's
            // AddinShmemInitLock) orders this against other processes attaching, and zeroed memory is
            // a valid empty table by `ValidWhenZeroed`. The lock pointer is the struct's first field.
            unsafe {
                if let Some(previous) = PREVIOUS_STARTUP {
                    previous();
                }
                let addin_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
                pg_sys::LWLockAcquire(addin_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
                let mut found = false;
                let place = pg_sys::ShmemInitStruct(NAME, SIZE, &mut found);
                if !found {
                    std::ptr::write_bytes(place.cast::<u8>(), 0, SIZE);
                    let tranche = pg_sys::GetNamedLWLockTranche(NAME);
                    *place.cast::<*mut pg_sys::LWLock>() = &raw mut (*tranche).lock;
                }
                *PLACE = place.cast();
                pg_sys::LWLockRelease(addin_lock);
            }
        }

        // SAFETY: _PG_init runs once, single-threaded, before the hooks can be called.
        unsafe {
            NAME = self.name.as_ptr();
            SIZE = size_of::<Shared<T>>();
            PLACE = self.shared.get().cast();
            PREVIOUS_REQUEST = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(on_request);
            PREVIOUS_STARTUP = pg_sys::shmem_startup_hook;
            pg_sys::shmem_startup_hook = Some(on_startup);
        }
    }
}

pub struct Guard<'a, T> {
    shared: &'a Shared<T>,
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock at least shared, so nobody writes through `&mut`.
        unsafe { &*self.shared.data.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: acquired by `lock`. While an error unwinds, the abort has released every LWLock
        // already, and releasing it twice is an error of its own.
        unsafe {
            if pg_sys::LWLockHeldByMe(self.shared.lock) {
                pg_sys::LWLockRelease(self.shared.lock);
            }
        }
    }
}

pub struct GuardMut<'a, T>(Guard<'a, T>);

impl<T> Deref for GuardMut<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for GuardMut<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock exclusively.
        unsafe { &mut *self.0.shared.data.get() }
    }
}
