//! Tables in shared memory behind an LWLock each, set up zeroed in place. pgrx's `PgLwLock` builds
//! its value on the postmaster's stack and copies it in; the depth table is megabytes, more than that
//! stack holds in a debug build. A table of atomics only may also be used without its lock.
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
// behind it is only reached through the LWLock, or, for a `LockFree` table, through its atomics.
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

    /// The table, read without the lock: for tables whose every field is an atomic.
    pub fn unlocked(&self) -> &T
    where
        T: LockFree,
    {
        // SAFETY: `LockFree` says that shared references are all the table ever hands out.
        unsafe { &*self.shared().data.get() }
    }

    /// Asks for the space and the lock; call from _PG_init while preloading.
    ///
    /// # Safety
    /// Call once per table, from _PG_init while shared_preload_libraries is processed; at most
    /// `TABLES` tables.
    pub unsafe fn request(&'static self) {
        // SAFETY: _PG_init runs single-threaded, before the hooks can be called.
        unsafe {
            let requests: *mut [Option<Request>; TABLES] = &raw mut REQUESTS;
            let free = (*requests)
                .iter_mut()
                .find(|request| request.is_none())
                .expect("room for every table bussig keeps in shared memory");
            *free = Some(Request {
                name: self.name.as_ptr(),
                size: size_of::<Shared<T>>(),
                place: self.shared.get().cast(),
            });
            if !HOOKED {
                HOOKED = true;
                PREVIOUS_REQUEST = pg_sys::shmem_request_hook;
                pg_sys::shmem_request_hook = Some(on_request);
                PREVIOUS_STARTUP = pg_sys::shmem_startup_hook;
                pg_sys::shmem_startup_hook = Some(on_startup);
            }
        }
    }
}

/// # Safety
/// Every field of the type is an atomic (or never changes after startup): it may be read and written
/// through shared references by many processes at once, without the lock.
pub unsafe trait LockFree: ValidWhenZeroed {}

/// Tables bussig keeps in shared memory this way.
const TABLES: usize = 5;

struct Request {
    name: *const std::ffi::c_char,
    size: usize,
    /// Where the table's address goes once shared memory is set up.
    place: *mut *mut (),
}

static mut REQUESTS: [Option<Request>; TABLES] = [const { None }; TABLES];
static mut HOOKED: bool = false;
static mut PREVIOUS_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREVIOUS_STARTUP: pg_sys::shmem_startup_hook_type = None;

#[pg_guard]
unsafe extern "C-unwind" fn on_request() {
    // SAFETY: the postmaster runs its hooks one at a time, after `request` filled REQUESTS.
    unsafe {
        if let Some(previous) = PREVIOUS_REQUEST {
            previous();
        }
        let requests: *const [Option<Request>; TABLES] = &raw const REQUESTS;
        for request in (*requests).iter().flatten() {
            pg_sys::RequestAddinShmemSpace(request.size);
            pg_sys::RequestNamedLWLockTranche(request.name, 1);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_startup() {
    // SAFETY: as above; the add-in lock (the 22nd of the main array, as PostgreSQL's
    // AddinShmemInitLock) orders this against other processes attaching, and zeroed memory is a
    // valid empty table by `ValidWhenZeroed`. The lock pointer is each table's first field.
    unsafe {
        if let Some(previous) = PREVIOUS_STARTUP {
            previous();
        }
        let addin_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(addin_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let requests: *const [Option<Request>; TABLES] = &raw const REQUESTS;
        for request in (*requests).iter().flatten() {
            let mut found = false;
            let place = pg_sys::ShmemInitStruct(request.name, request.size, &mut found);
            if !found {
                std::ptr::write_bytes(place.cast::<u8>(), 0, request.size);
                let tranche = pg_sys::GetNamedLWLockTranche(request.name);
                *place.cast::<*mut pg_sys::LWLock>() = &raw mut (*tranche).lock;
            }
            *request.place = place.cast();
        }
        pg_sys::LWLockRelease(addin_lock);
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
