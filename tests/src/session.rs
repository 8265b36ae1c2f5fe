//! The client the tests use: `postgres::Client`'s calls, but every statement with parameters goes out
//! unnamed, parsed, bound and run in one round trip. A transaction-pooling proxy such as pgbouncer may
//! hand each transaction another server connection, where a named prepared statement would not exist;
//! so the same tests run directly and through the proxy.
use postgres::types::{ToSql, Type};
use postgres::{Error, NoTls, Row};
use serde_json::Value;
use uuid::Uuid;

/// A type whose PostgreSQL type the client names when it sends a parameter.
pub trait Typed {
    fn sql_type() -> Type;
    /// The type of an array of it.
    fn array_type() -> Type {
        unimplemented!("no array type for {}", Self::sql_type())
    }
}

macro_rules! typed {
    ($($rust:ty => $sql:ident, $array:ident;)*) => {$(
        impl Typed for $rust {
            fn sql_type() -> Type { Type::$sql }
            fn array_type() -> Type { Type::$array }
        }
    )*};
}

typed! {
    str => TEXT, TEXT_ARRAY;
    String => TEXT, TEXT_ARRAY;
    bool => BOOL, BOOL_ARRAY;
    i16 => INT2, INT2_ARRAY;
    i32 => INT4, INT4_ARRAY;
    i64 => INT8, INT8_ARRAY;
    f64 => FLOAT8, FLOAT8_ARRAY;
    Uuid => UUID, UUID_ARRAY;
    Value => JSONB, JSONB_ARRAY;
    std::time::SystemTime => TIMESTAMPTZ, TIMESTAMPTZ_ARRAY;
}

impl<T: Typed> Typed for Vec<T> {
    fn sql_type() -> Type {
        T::array_type()
    }
}

impl<T: Typed> Typed for [T] {
    fn sql_type() -> Type {
        T::array_type()
    }
}

impl<T: Typed + ?Sized> Typed for &T {
    fn sql_type() -> Type {
        T::sql_type()
    }
    fn array_type() -> Type {
        T::array_type()
    }
}

impl<T: Typed> Typed for Option<T> {
    fn sql_type() -> Type {
        T::sql_type()
    }
}

/// A statement parameter that knows its PostgreSQL type.
pub trait Param: ToSql + Sync {
    fn sql_type(&self) -> Type;
    fn as_sql(&self) -> &(dyn ToSql + Sync);
}

impl<T: Typed + ToSql + Sync> Param for T {
    fn sql_type(&self) -> Type {
        <T as Typed>::sql_type()
    }
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        self
    }
}

fn typed<'a>(params: &'a [&'a dyn Param]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|p| (p.as_sql(), p.sql_type())).collect()
}

fn exactly_one(sql: &str, mut rows: Vec<Row>) -> Result<Row, Error> {
    assert_eq!(
        rows.len(),
        1,
        "{sql} returned {} rows, expected one",
        rows.len()
    );
    Ok(rows.pop().expect("one row"))
}

fn at_most_one(sql: &str, mut rows: Vec<Row>) -> Result<Option<Row>, Error> {
    assert!(
        rows.len() <= 1,
        "{sql} returned {} rows, expected at most one",
        rows.len()
    );
    Ok(rows.pop())
}

/// What a connection and a transaction on it both do (`use bussig_tests::*` brings it in scope).
pub trait GenericClient {
    fn raw(&mut self) -> &mut postgres::Client;

    fn query(&mut self, sql: &str, params: &[&dyn Param]) -> Result<Vec<Row>, Error> {
        self.raw().query_typed(sql, &typed(params))
    }

    fn query_one(&mut self, sql: &str, params: &[&dyn Param]) -> Result<Row, Error> {
        let rows = self.query(sql, params)?;
        exactly_one(sql, rows)
    }

    fn query_opt(&mut self, sql: &str, params: &[&dyn Param]) -> Result<Option<Row>, Error> {
        let rows = self.query(sql, params)?;
        at_most_one(sql, rows)
    }

    fn execute(&mut self, sql: &str, params: &[&dyn Param]) -> Result<u64, Error> {
        self.raw().execute_typed(sql, &typed(params))
    }

    fn batch_execute(&mut self, sql: &str) -> Result<(), Error> {
        self.raw().batch_execute(sql)
    }
}

pub struct Client {
    inner: postgres::Client,
}

impl Client {
    pub fn connect(url: &str, tls: NoTls) -> Result<Client, Error> {
        Ok(Client {
            inner: postgres::Client::connect(url, tls)?,
        })
    }

    /// BEGIN; the transaction rolls back when dropped without `commit`.
    pub fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        self.inner.batch_execute("BEGIN")?;
        Ok(Transaction {
            client: &mut self.inner,
            open: true,
        })
    }

    /// The underlying connection, for what only a session of its own can do (LISTEN).
    pub fn session(&mut self) -> &mut postgres::Client {
        &mut self.inner
    }

    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

impl GenericClient for Client {
    fn raw(&mut self) -> &mut postgres::Client {
        &mut self.inner
    }
}

pub struct Transaction<'a> {
    client: &'a mut postgres::Client,
    open: bool,
}

impl Transaction<'_> {
    pub fn commit(mut self) -> Result<(), Error> {
        self.open = false;
        self.client.batch_execute("COMMIT")
    }

    pub fn rollback(mut self) -> Result<(), Error> {
        self.open = false;
        self.client.batch_execute("ROLLBACK")
    }
}

impl GenericClient for Transaction<'_> {
    fn raw(&mut self) -> &mut postgres::Client {
        self.client
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.open && !self.client.is_closed() {
            let _ = self.client.batch_execute("ROLLBACK");
        }
    }
}
