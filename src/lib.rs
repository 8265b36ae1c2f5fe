//! bussig: a message bus inside PostgreSQL. The SQL surface lives in `api`, storage in `sql/`.
// The SQL boundary returns pgrx's ErrorReport, which is large by design; it is built only on error.
#![allow(clippy::result_large_err)]

use pgrx::prelude::*;

mod access;
mod api;
mod datum;
mod direct_insert;
mod error;
mod gucs;
mod invalidation;
mod plans;
mod routing;
mod validate;
mod wakeup;
mod worker;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/topics.sql", name = "topics", requires = ["schema"]);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::register();
    plans::init();
    wakeup::init();
    worker::register();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
