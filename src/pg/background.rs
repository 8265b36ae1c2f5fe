//! What the background worker needs from PostgreSQL beyond SPI: transactions of its own, the
//! extension's lock, the catalog of databases, configuration reloads, latches and sleeps.
use std::ffi::CStr;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::{pg_sys, PgTryBuilder};

use crate::error::BusResult;

/// Whether the server is loading bussig from shared_preload_libraries now (only then can a
/// background worker be registered).
pub fn preloading() -> bool {
    // SAFETY: a plain read of a flag the postmaster sets while it loads preloaded libraries.
    unsafe { pg_sys::process_shared_preload_libraries_in_progress }
}

/// The name of the connected database; needs a transaction (it reads the catalog cache).
pub fn current_database() -> String {
    // SAFETY: inside a transaction, as the catalog cache needs; the name is checked for NULL and
    // copied.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            return String::new();
        }
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

/// Runs `step` in a transaction of its own, holding off a DROP EXTENSION (see
/// `hold_off_extension_drop`): None when the extension is absent or being dropped, else the step's
/// result, its error as text after the transaction was rolled back.
pub fn in_transaction<T>(
    step: impl FnOnce() -> BusResult<T> + std::panic::UnwindSafe,
) -> Option<Result<T, String>> {
    // SAFETY: the worker runs steps one after the other, outside any transaction; each starts one
    // here and ends it below, on every path.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        if !hold_off_extension_drop() {
            pg_sys::AbortCurrentTransaction();
            return None;
        }
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let outcome = PgTryBuilder::new(|| step().map_err(|error| error.to_string()))
        .catch_others(|caught| {
            Err(match caught {
                pg_sys::panic::CaughtError::PostgresError(report)
                | pg_sys::panic::CaughtError::ErrorReport(report) => report.message().to_string(),
                pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
                    ereport.message().to_string()
                }
            })
        })
        .execute();
    match &outcome {
        // SAFETY: ends the transaction started above, with the snapshot it pushed.
        Ok(_) => unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        },
        // SAFETY: the step failed inside the transaction started above; this rolls it back and
        // resets the error state.
        Err(_) => unsafe { pg_sys::AbortCurrentTransaction() },
    }
    Some(outcome)
}

/// Whether the extension is in this database now, though a `DROP EXTENSION` may be waiting for its
/// lock (and may yet be cancelled, fail or roll back). Outside any transaction: it runs one.
pub fn extension_present() -> bool {
    // SAFETY: the worker's main loop, outside any transaction; the look-up reads the catalog inside
    // the transaction started and ended here.
    unsafe {
        pg_sys::StartTransactionCommand();
        let present = pg_sys::get_extension_oid(c"bussig".as_ptr(), true) != pg_sys::InvalidOid;
        pg_sys::CommitTransactionCommand();
        present
    }
}

/// Takes a share lock on the extension for the rest of this transaction, if nobody is dropping it: false
/// when it is absent or a `DROP EXTENSION` holds or waits for it. DROP EXTENSION locks the extension
/// before the tables it drops; a step that locked a table first and then waited for one the drop
/// already held would deadlock with it (and the drop might be the one cancelled). Holding the
/// extension's lock first, the step finishes and the drop waits for it, never the other way round.
fn hold_off_extension_drop() -> bool {
    // SAFETY: called inside a transaction with a database connection: the catalog look-up and the lock
    // (released at transaction end) need both.
    unsafe {
        let extension = pg_sys::get_extension_oid(c"bussig".as_ptr(), true);
        if extension == pg_sys::InvalidOid {
            return false;
        }
        let tag = pg_sys::LOCKTAG {
            locktag_field1: pg_sys::MyDatabaseId.to_u32(),
            locktag_field2: pg_sys::ExtensionRelationId.to_u32(),
            locktag_field3: extension.to_u32(),
            locktag_field4: 0,
            locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
            locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
        };
        let taken = pg_sys::LockAcquire(&tag, pg_sys::AccessShareLock as i32, false, true);
        if taken == pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL {
            return false;
        }
        // A drop that committed between the look-up and the lock: see it now.
        pg_sys::AcceptInvalidationMessages();
        pg_sys::get_extension_oid(c"bussig".as_ptr(), true) == extension
    }
}

pub fn reload_settings_if_asked() {
    if BackgroundWorker::sighup_received() {
        // SAFETY: the worker's main loop, outside any transaction, as re-reading the configuration
        // requires.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
}

/// Databases that accept connections, read from the shared catalog (the launcher has no database).
pub fn databases() -> Vec<(pg_sys::Oid, String)> {
    let mut found = Vec::new();
    // SAFETY: a catalog scan in a transaction of its own, ended in this block; each tuple's fields
    // are copied before the next.
    unsafe {
        pg_sys::StartTransactionCommand();
        let relation =
            pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::table_beginscan_catalog(relation, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let database = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            if database.datallowconn && !database.datistemplate {
                let name = CStr::from_ptr(database.datname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                found.push((database.oid, name));
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(relation, pg_sys::AccessShareLock as i32);
        pg_sys::CommitTransactionCommand();
    }
    found
}

/// Sleeps `micros` microseconds.
pub fn pause(micros: std::ffi::c_long) {
    // SAFETY: a plain sleep of this process.
    unsafe { pg_sys::pg_usleep(micros) };
}

/// Ends this process's next latch wait at once.
pub fn set_my_latch() {
    // SAFETY: this process's own latch, which lives as long as the process.
    unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
}
