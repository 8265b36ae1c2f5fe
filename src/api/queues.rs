//! Queue definitions: create, alter, drop, purge.
use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::datum::{DatumWithOid, Interval};
use pgrx::pg_sys::{self, panic::ErrorReport};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::access::{self, Caller, Privilege};
use crate::error::{BusError, BusResult};
use crate::invalidation;
use crate::plans::{self, Statement};
use crate::validate;

/// A queue, as read from bussig.queue.
pub struct QueueRef {
    pub queue_id: i32,
    pub dead_letter_queue_id: Option<i32>,
    pub notify: bool,
}

static RESOLVE: Statement = Statement {
    sql: "SELECT queue_id, dead_letter_queue_id, notify FROM bussig.queue WHERE name = $1",
    args: &[pg_sys::TEXTOID],
    writes: false,
};

pub fn resolve(client: &mut SpiClient<'_>, name: &str) -> BusResult<Option<QueueRef>> {
    let Some(row) = plans::run(client, &RESOLVE, &[name.into()])?.next() else {
        return Ok(None);
    };
    Ok(Some(QueueRef {
        queue_id: row.get(1)?.expect("queue_id is NOT NULL"),
        dead_letter_queue_id: row.get(2)?,
        notify: row.get(3)?.expect("NOT NULL"),
    }))
}

/// What sending to and acknowledging in a queue need, cached per backend by queue name.
#[derive(Clone, Copy)]
pub struct Destination {
    pub queue_id: i32,
    pub notify: bool,
}

/// Queues a backend remembers before it starts over: names of short-lived queues come and go.
const KNOWN_QUEUES_LIMIT: usize = 10_000;

thread_local! {
    /// Queues this backend looked up by name, and the invalidation generation they belong to.
    static KNOWN: RefCell<(u64, HashMap<String, Destination>)> = RefCell::new((0, HashMap::new()));
}

// A writing statement, so that it reads with a new snapshot (see `invalidation::may_keep`). The row's
// xmin tells whether this transaction wrote it.
static RESOLVE_DESTINATION: Statement = Statement {
    sql: "SELECT queue_id, notify, xmin::text::bigint FROM bussig.queue WHERE name = $1",
    args: &[pg_sys::TEXTOID],
    writes: true,
};

/// The queue named `name`, from this backend's cache when no change to any queue's name or notify
/// flag, and no drop, came since. A queue this transaction created or changed is not cached: the
/// transaction may still roll back, and a new queue announces itself to no cache.
pub fn destination(client: &mut SpiClient<'_>, name: &str) -> BusResult<Option<Destination>> {
    let generation = invalidation::generation(client)?;
    if let Some(found) = known(generation, name) {
        return Ok(Some(found));
    }
    let Some(row) = plans::run(client, &RESOLVE_DESTINATION, &[name.into()])?.next() else {
        return Ok(None);
    };
    let found = Destination {
        queue_id: row.get(1)?.expect("queue_id is NOT NULL"),
        notify: row.get(2)?.expect("NOT NULL"),
    };
    let writer = pg_sys::TransactionId::from(row.get::<i64>(3)?.expect("NOT NULL") as u32);
    let written_here = unsafe { pg_sys::TransactionIdIsCurrentTransactionId(writer) };
    if !written_here && invalidation::may_keep(generation) {
        KNOWN.with(|known| {
            let mut known = known.borrow_mut();
            if known.0 != generation || known.1.len() >= KNOWN_QUEUES_LIMIT {
                *known = (generation, HashMap::new());
            }
            known.1.insert(name.to_string(), found);
        });
    }
    Ok(Some(found))
}

fn known(generation: u64, name: &str) -> Option<Destination> {
    KNOWN.with(|known| {
        let known = known.borrow();
        (known.0 == generation)
            .then(|| known.1.get(name).copied())
            .flatten()
    })
}

/// The queue named `name` when this backend's cache holds it and can tell, without a statement,
/// that it is current.
pub fn cached_destination(name: &str) -> Option<Destination> {
    known(invalidation::known_generation()?, name)
}

/// The cached queue, or 42704 when there is no such queue.
pub fn require_destination(client: &mut SpiClient<'_>, name: &str) -> BusResult<Destination> {
    destination(client, name)?.ok_or_else(|| BusError::UnknownQueue(name.to_string()))
}

pub fn require(client: &mut SpiClient<'_>, name: &str) -> BusResult<QueueRef> {
    resolve(client, name)?.ok_or_else(|| BusError::UnknownQueue(name.to_string()))
}

/// Every setting of a queue, complete and checked.
pub struct QueueSettings {
    max_deliveries: i32,
    lock_timeout: Interval,
    message_ttl: Option<Interval>,
    retry_delay: Interval,
    retry_delay_max: Interval,
    retry_multiplier: f64,
    dedup_window: Interval,
    notify: bool,
}

impl Default for QueueSettings {
    /// The defaults create_queue documents in its signature.
    fn default() -> Self {
        QueueSettings {
            max_deliveries: 5,
            lock_timeout: Interval::from_seconds(30.0),
            message_ttl: None,
            retry_delay: Interval::from_seconds(1.0),
            retry_delay_max: Interval::from_minutes(15),
            retry_multiplier: 2.0,
            dedup_window: Interval::from_minutes(5),
            notify: false,
        }
    }
}

/// The settings a caller named; None leaves a setting as it is. A zero message_ttl removes the TTL.
#[derive(Default)]
pub struct SettingsChange {
    pub max_deliveries: Option<i32>,
    pub lock_timeout: Option<Interval>,
    pub message_ttl: Option<Interval>,
    pub retry_delay: Option<Interval>,
    pub retry_delay_max: Option<Interval>,
    pub retry_multiplier: Option<f64>,
    pub dedup_window: Option<Interval>,
    pub notify: Option<bool>,
}

impl SettingsChange {
    fn apply(self, base: QueueSettings) -> BusResult<QueueSettings> {
        let settings = QueueSettings {
            max_deliveries: self.max_deliveries.unwrap_or(base.max_deliveries),
            lock_timeout: self.lock_timeout.unwrap_or(base.lock_timeout),
            message_ttl: match self.message_ttl {
                Some(ttl) if validate::is_zero(&ttl) => None,
                Some(ttl) => Some(ttl),
                None => base.message_ttl,
            },
            retry_delay: self.retry_delay.unwrap_or(base.retry_delay),
            retry_delay_max: self.retry_delay_max.unwrap_or(base.retry_delay_max),
            retry_multiplier: self.retry_multiplier.unwrap_or(base.retry_multiplier),
            dedup_window: self.dedup_window.unwrap_or(base.dedup_window),
            notify: self.notify.unwrap_or(base.notify),
        };
        settings.check()?;
        Ok(settings)
    }
}

impl QueueSettings {
    fn check(&self) -> BusResult<()> {
        if self.max_deliveries < 1 {
            return Err(BusError::invalid("max_deliveries", "it must be at least 1"));
        }
        validate::positive(&self.lock_timeout, "lock_timeout")?;
        if let Some(ttl) = &self.message_ttl {
            validate::not_negative(ttl, "message_ttl")?;
        }
        validate::not_negative(&self.retry_delay, "retry_delay")?;
        validate::not_negative(&self.retry_delay_max, "retry_delay_max")?;
        validate::at_most(
            &self.retry_delay,
            &self.retry_delay_max,
            "retry_delay_max",
            "it must not be shorter than retry_delay",
        )?;
        if !(self.retry_multiplier >= 1.0 && self.retry_multiplier.is_finite()) {
            return Err(BusError::invalid(
                "retry_multiplier",
                "it must be a finite number of at least 1",
            ));
        }
        validate::not_negative(&self.dedup_window, "dedup_window")
    }

    /// NOTIFY channels are identifiers of at most 63 bytes: "bussig_" leaves 56 for the name.
    fn check_notify(&self, queue: &str) -> BusResult<()> {
        if self.notify && queue.len() > MAX_NOTIFY_QUEUE_NAME {
            return Err(BusError::invalid(
                "notify",
                format!("the channel bussig_{queue} would be longer than 63 bytes; notify needs a queue name of at most {MAX_NOTIFY_QUEUE_NAME} characters"),
            ));
        }
        Ok(())
    }

    fn args(&self) -> [DatumWithOid<'static>; 8] {
        [
            self.max_deliveries.into(),
            self.lock_timeout.into(),
            self.message_ttl.into(),
            self.retry_delay.into(),
            self.retry_delay_max.into(),
            self.retry_multiplier.into(),
            self.dedup_window.into(),
            self.notify.into(),
        ]
    }
}

const MAX_NOTIFY_QUEUE_NAME: usize = 56;

/// Parameter types of QueueSettings::args(), which statements take first.
const SETTINGS_OIDS: [pg_sys::Oid; 8] = [
    pg_sys::INT4OID,
    pg_sys::INTERVALOID,
    pg_sys::INTERVALOID,
    pg_sys::INTERVALOID,
    pg_sys::INTERVALOID,
    pg_sys::FLOAT8OID,
    pg_sys::INTERVALOID,
    pg_sys::BOOLOID,
];

const fn settings_then<const EXTRA: usize, const ALL: usize>(
    extra: [pg_sys::Oid; EXTRA],
) -> [pg_sys::Oid; ALL] {
    let mut all = [pg_sys::InvalidOid; ALL];
    let mut i = 0;
    while i < ALL {
        all[i] = if i < SETTINGS_OIDS.len() {
            SETTINGS_OIDS[i]
        } else {
            extra[i - SETTINGS_OIDS.len()]
        };
        i += 1;
    }
    all
}

static INSERT_QUEUE: Statement = Statement {
    sql: "INSERT INTO bussig.queue (max_deliveries, lock_timeout, message_ttl, retry_delay, retry_delay_max,
                                    retry_multiplier, dedup_window, notify, name, dead_letter_owner_id, owner)
          VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, pg_catalog.pg_get_userbyid($11))
          ON CONFLICT (name) DO NOTHING
          RETURNING queue_id",
    args: &settings_then::<3, 11>([pg_sys::TEXTOID, pg_sys::INT4OID, pg_sys::OIDOID]),
    writes: true,
};

static LOAD_SETTINGS: Statement = Statement {
    sql: "SELECT max_deliveries, lock_timeout, message_ttl, retry_delay, retry_delay_max, retry_multiplier,
                 dedup_window, notify, queue_id
          FROM bussig.queue WHERE name = $1 FOR UPDATE",
    args: &[pg_sys::TEXTOID],
    writes: true,
};

static UPDATE_SETTINGS: Statement = Statement {
    sql: "UPDATE bussig.queue
          SET max_deliveries = $1, lock_timeout = $2, message_ttl = $3, retry_delay = $4,
              retry_delay_max = $5, retry_multiplier = $6, dedup_window = $7, notify = $8
          WHERE queue_id = $9",
    args: &settings_then::<1, 9>([pg_sys::INT4OID]),
    writes: true,
};

static SET_DEAD_LETTER_QUEUE: Statement = Statement {
    sql: "UPDATE bussig.queue SET dead_letter_queue_id = $2 WHERE queue_id = $1",
    args: &[pg_sys::INT4OID, pg_sys::INT4OID],
    writes: true,
};

// Whether following dead-letter queues from $2 leads back to $1.
static DEAD_LETTER_CYCLE: Statement = Statement {
    sql: "WITH RECURSIVE chain(queue_id) AS (
              SELECT $2
              UNION
              SELECT q.dead_letter_queue_id FROM bussig.queue q JOIN chain USING (queue_id)
              WHERE q.dead_letter_queue_id IS NOT NULL
          )
          SELECT EXISTS (SELECT FROM chain WHERE queue_id = $1)",
    args: &[pg_sys::INT4OID, pg_sys::INT4OID],
    writes: false,
};

static DEAD_LETTER_USERS: Statement = Statement {
    sql: "SELECT string_agg(quote_ident(name), ', ' ORDER BY name)
          FROM bussig.queue WHERE dead_letter_queue_id = $1 AND queue_id <> $1",
    args: &[pg_sys::INT4OID],
    writes: false,
};

// The queue goes with its messages, its de-duplication keys and the dead-letter queue made for it,
// unless another queue still sends its dead letters there.
static DROP_QUEUE: Statement = Statement {
    sql: "WITH doomed AS (
              SELECT $1 AS queue_id
              UNION ALL
              SELECT d.queue_id FROM bussig.queue d
              WHERE d.dead_letter_owner_id = $1
                AND NOT EXISTS (SELECT FROM bussig.queue u
                                WHERE u.dead_letter_queue_id = d.queue_id AND u.queue_id <> $1)
          ), gone_messages AS (
              DELETE FROM bussig.message in_order WHERE queue_id IN (SELECT queue_id FROM doomed)
                    ), gone_keys AS (
              DELETE FROM bussig.dedup WHERE queue_id IN (SELECT queue_id FROM doomed)
          ), recorded AS (
              INSERT INTO bussig.dropped_queue (queue_id) SELECT queue_id FROM doomed
              ON CONFLICT (queue_id) DO UPDATE SET dropped_at = excluded.dropped_at
          )
          DELETE FROM bussig.queue WHERE queue_id IN (SELECT queue_id FROM doomed) RETURNING queue_id",
    args: &[pg_sys::INT4OID],
    writes: true,
};

static PURGE_QUEUE: Statement = Statement {
    sql: "DELETE FROM bussig.message in_order WHERE queue_id = $1",
    args: &[pg_sys::INT4OID],
    writes: true,
};

fn insert_queue(
    client: &mut SpiClient<'_>,
    name: &str,
    settings: &QueueSettings,
    dead_letter_owner_id: Option<i32>,
    owner: pg_sys::Oid,
) -> BusResult<Option<i32>> {
    let [a1, a2, a3, a4, a5, a6, a7, a8] = settings.args();
    let args = [
        a1,
        a2,
        a3,
        a4,
        a5,
        a6,
        a7,
        a8,
        name.into(),
        dead_letter_owner_id.into(),
        owner.into(),
    ];
    let Some(row) = plans::run(client, &INSERT_QUEUE, &args)?.next() else {
        return Ok(None);
    };
    let queue_id: Option<i32> = row.get(1)?;
    queue_id.into_iter().for_each(crate::depth::created);
    Ok(queue_id)
}

/// The dead-letter queue called `name`, created for the caller with default settings and none of its
/// own if missing. An existing one must take the caller's sends: dead letters are sends to it.
fn ensure_dead_letter_queue(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    name: &str,
    owner_id: Option<i32>,
) -> BusResult<i32> {
    if let Some(found) = resolve(client, name)? {
        caller.require(client, name, Privilege::Send)?;
        return Ok(found.queue_id);
    }
    caller.require_create(client, name)?;
    let settings = QueueSettings::default();
    if let Some(queue_id) = insert_queue(client, name, &settings, owner_id, caller.role())? {
        return Ok(queue_id);
    }
    Ok(require(client, name)?.queue_id)
}

fn own_dead_letter_queue_name(queue: &str) -> BusResult<String> {
    let name = format!("{queue}_dlq");
    if name.len() > validate::MAX_QUEUE_NAME_LEN {
        return Err(BusError::invalid(
            "queue",
            format!("its dead-letter queue name \"{name}\" would be longer than 60 characters; name a dead_letter_queue"),
        ));
    }
    Ok(name)
}

fn checked_dead_letter_queue<'a>(queue: &str, dead_letter_queue: &'a str) -> BusResult<&'a str> {
    let name = validate::queue_name(Some(dead_letter_queue))?;
    if name == queue {
        return Err(BusError::invalid(
            "dead_letter_queue",
            "a queue cannot be its own dead-letter queue",
        ));
    }
    Ok(name)
}

/// Creates `queue` and its dead-letter queue; false when the queue already existed (left untouched).
pub fn create(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    queue: &str,
    change: SettingsChange,
    dead_letter_queue: Option<&str>,
) -> BusResult<bool> {
    let settings = change.apply(QueueSettings::default())?;
    settings.check_notify(queue)?;
    if resolve(client, queue)?.is_some() {
        return Ok(false);
    }
    caller.require_create(client, queue)?;
    let (dead_letter_name, owned) = match dead_letter_queue {
        Some(name) => (checked_dead_letter_queue(queue, name)?.to_string(), false),
        None => (own_dead_letter_queue_name(queue)?, true),
    };
    let Some(queue_id) = insert_queue(client, queue, &settings, None, caller.role())? else {
        return Ok(false);
    };
    let dead_letter_id =
        ensure_dead_letter_queue(client, caller, &dead_letter_name, owned.then_some(queue_id))?;
    plans::run(
        client,
        &SET_DEAD_LETTER_QUEUE,
        &[queue_id.into(), dead_letter_id.into()],
    )?;
    Ok(true)
}

/// Refuses an explicit NULL for a setting that has a default: NULL there is almost always a bug.
fn setting<T>(value: Option<T>, what: &'static str) -> BusResult<Option<T>> {
    validate::required(value, what).map(Some)
}

#[allow(clippy::too_many_arguments)]
#[pg_extern]
fn create_queue(
    queue: Option<&str>,
    max_deliveries: default!(Option<i32>, 5),
    lock_timeout: default!(Option<Interval>, "'30 seconds'"),
    message_ttl: default!(Option<Interval>, "NULL"),
    retry_delay: default!(Option<Interval>, "'1 second'"),
    retry_delay_max: default!(Option<Interval>, "'15 minutes'"),
    retry_multiplier: default!(Option<f64>, 2.0),
    dedup_window: default!(Option<Interval>, "'5 minutes'"),
    dead_letter_queue: default!(Option<&str>, "NULL"),
    notify: default!(Option<bool>, false),
) -> Result<bool, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let change = SettingsChange {
        max_deliveries: setting(max_deliveries, "max_deliveries")?,
        lock_timeout: setting(lock_timeout, "lock_timeout")?,
        message_ttl,
        retry_delay: setting(retry_delay, "retry_delay")?,
        retry_delay_max: setting(retry_delay_max, "retry_delay_max")?,
        retry_multiplier: setting(retry_multiplier, "retry_multiplier")?,
        dedup_window: setting(dedup_window, "dedup_window")?,
        notify: setting(notify, "notify")?,
    };
    Ok(access::connect(|client, caller| {
        create(client, caller, queue, change, dead_letter_queue)
    })?)
}

#[allow(clippy::too_many_arguments)]
#[pg_extern]
fn alter_queue(
    queue: Option<&str>,
    max_deliveries: default!(Option<i32>, "NULL"),
    lock_timeout: default!(Option<Interval>, "NULL"),
    message_ttl: default!(Option<Interval>, "NULL"),
    retry_delay: default!(Option<Interval>, "NULL"),
    retry_delay_max: default!(Option<Interval>, "NULL"),
    retry_multiplier: default!(Option<f64>, "NULL"),
    dedup_window: default!(Option<Interval>, "NULL"),
    dead_letter_queue: default!(Option<&str>, "NULL"),
    notify: default!(Option<bool>, "NULL"),
) -> Result<(), ErrorReport> {
    let queue = validate::queue_name(queue)?;
    let change = SettingsChange {
        max_deliveries,
        lock_timeout,
        message_ttl,
        retry_delay,
        retry_delay_max,
        retry_multiplier,
        dedup_window,
        notify,
    };
    Ok(access::connect(|client, caller| -> BusResult<()> {
        caller.require(client, queue, Privilege::Manage)?;
        let Some(row) = plans::run(client, &LOAD_SETTINGS, &[queue.into()])?.next() else {
            return Err(BusError::UnknownQueue(queue.to_string()));
        };
        let current = QueueSettings {
            max_deliveries: row.get(1)?.expect("NOT NULL"),
            lock_timeout: row.get(2)?.expect("NOT NULL"),
            message_ttl: row.get(3)?,
            retry_delay: row.get(4)?.expect("NOT NULL"),
            retry_delay_max: row.get(5)?.expect("NOT NULL"),
            retry_multiplier: row.get(6)?.expect("NOT NULL"),
            dedup_window: row.get(7)?.expect("NOT NULL"),
            notify: row.get(8)?.expect("NOT NULL"),
        };
        let queue_id: i32 = row.get(9)?.expect("NOT NULL");
        let settings = change.apply(current)?;
        settings.check_notify(queue)?;
        let [a1, a2, a3, a4, a5, a6, a7, a8] = settings.args();
        plans::run(
            client,
            &UPDATE_SETTINGS,
            &[a1, a2, a3, a4, a5, a6, a7, a8, queue_id.into()],
        )?;
        if let Some(name) = dead_letter_queue {
            let name = checked_dead_letter_queue(queue, name)?;
            let dead_letter_id = ensure_dead_letter_queue(client, caller, name, None)?;
            let args = [queue_id.into(), dead_letter_id.into()];
            if plans::first_value::<bool>(client, &DEAD_LETTER_CYCLE, &args)? == Some(true) {
                return Err(BusError::invalid(
                    "dead_letter_queue",
                    format!("\"{name}\" sends its dead letters on to \"{queue}\": messages would go round in a circle"),
                ));
            }
            plans::run(
                client,
                &SET_DEAD_LETTER_QUEUE,
                &[queue_id.into(), dead_letter_id.into()],
            )?;
        }
        Ok(())
    })?)
}

/// The queues that send their dead letters to this one, as a list; None when there are none.
fn dead_letter_users(client: &mut SpiClient<'_>, queue_id: i32) -> BusResult<Option<String>> {
    Ok(plans::first_value(
        client,
        &DEAD_LETTER_USERS,
        &[queue_id.into()],
    )?)
}

/// Drops a queue with its messages, keys, subscriptions and own dead-letter queue; false when other
/// queues still send their dead letters to it.
pub fn drop_queue_by_id(client: &mut SpiClient<'_>, queue_id: i32) -> BusResult<bool> {
    if dead_letter_users(client, queue_id)?.is_some() {
        return Ok(false);
    }
    for row in plans::run(client, &DROP_QUEUE, &[queue_id.into()])? {
        crate::depth::dropped(row.get(1)?.expect("NOT NULL"));
    }
    Ok(true)
}

#[pg_extern]
fn drop_queue(queue: Option<&str>) -> Result<bool, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    Ok(access::connect(|client, caller| -> BusResult<bool> {
        let Some(found) = resolve(client, queue)? else {
            return Ok(false);
        };
        caller.require(client, queue, Privilege::Manage)?;
        if let Some(users) = dead_letter_users(client, found.queue_id)? {
            return Err(BusError::DeadLetterQueueInUse {
                queue: queue.to_string(),
                users,
            });
        }
        drop_queue_by_id(client, found.queue_id)
    })?)
}

#[pg_extern]
fn purge_queue(queue: Option<&str>) -> Result<i64, ErrorReport> {
    let queue = validate::queue_name(queue)?;
    Ok(access::connect(|client, caller| -> BusResult<i64> {
        caller.require(client, queue, Privilege::Manage)?;
        let found = require(client, queue)?;
        let purged = plans::run(client, &PURGE_QUEUE, &[found.queue_id.into()])?.len();
        crate::depth::removed(found.queue_id, purged);
        Ok(purged as i64)
    })?)
}
