//! Creating, changing, dropping and purging queues, with the dead-letter queues they come with.
use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use super::require;
use super::settings::{settings_then, QueueSettings, SettingsChange};
use crate::access::{Caller, Privilege};
use crate::error::{BusError, BusResult};
use crate::message::in_flight;
use crate::plans::{self, Statement};
use crate::validate;

static INSERT_QUEUE: Statement = Statement {
    sql: "INSERT INTO bussig.queue (max_deliveries, lock_timeout, message_ttl, retry_delay, retry_delay_max,
                                    retry_multiplier, dedup_window, notify, max_in_flight, name,
                                    dead_letter_owner_id, owner)
          VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, pg_catalog.pg_get_userbyid($12))
          ON CONFLICT (name) DO NOTHING
          RETURNING queue_id",
    args: &settings_then::<3, 12>([pg_sys::TEXTOID, pg_sys::INT4OID, pg_sys::OIDOID]),
    writes: true,
};

static LOAD_SETTINGS: Statement = Statement {
    sql: "SELECT max_deliveries, lock_timeout, message_ttl, retry_delay, retry_delay_max, retry_multiplier,
                 dedup_window, notify, max_in_flight, queue_id
          FROM bussig.queue WHERE name = $1 FOR UPDATE",
    args: &[pg_sys::TEXTOID],
    writes: true,
};

static UPDATE_SETTINGS: Statement = Statement {
    sql: "UPDATE bussig.queue
          SET max_deliveries = $1, lock_timeout = $2, message_ttl = $3, retry_delay = $4,
              retry_delay_max = $5, retry_multiplier = $6, dedup_window = $7, notify = $8,
              max_in_flight = $9
          WHERE queue_id = $10",
    args: &settings_then::<1, 10>([pg_sys::INT4OID]),
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
// unless another queue still sends its dead letters there: those queues' ids, found once.
static DOOMED: Statement = Statement {
    sql: "SELECT array_agg(doomed.queue_id) FROM (
              SELECT $1 AS queue_id
              UNION ALL
              SELECT d.queue_id FROM bussig.queue d
              WHERE d.dead_letter_owner_id = $1
                AND NOT EXISTS (SELECT FROM bussig.queue u
                                WHERE u.dead_letter_queue_id = d.queue_id AND u.queue_id <> $1)) doomed",
    args: &[pg_sys::INT4OID],
    writes: true,
};

static HAS_GROUPS: Statement = Statement {
    sql: "SELECT EXISTS (SELECT FROM bussig.message_group WHERE queue_id = ANY ($1))",
    args: &[pg_sys::INT4ARRAYOID],
    writes: true,
};

// The messages of queues with groups go in group order: ungrouped ones first, then each group's from
// its head on, as an ack takes a head and then moves its follower up. One DELETE in delivery order
// took a parked follower of a higher priority before its head, and the ack the other way round:
// each waited for the other (40P01). The rows are locked in that order, then deleted by id: by the
// ctid it locked, a row that a commit after the statement's snapshot had changed (an ack moving a
// follower up, a read) was invisible to the delete and stayed behind.
static DELETE_IN_GROUP_ORDER: Statement = Statement {
    sql: "WITH taken AS (
              SELECT in_order.message_id FROM bussig.message in_order
              WHERE in_order.queue_id = ANY ($1)
              ORDER BY in_order.group_id NULLS FIRST, in_order.group_seq, in_order.message_id
              FOR UPDATE OF in_order)
          DELETE FROM bussig.message by_id USING taken WHERE by_id.message_id = taken.message_id",
    args: &[pg_sys::INT4ARRAYOID],
    writes: true,
};

static DROP_QUEUE: Statement = Statement {
    sql: "WITH doomed AS (
              SELECT unnest($1::int[]) AS queue_id
          ), gone_messages AS (
              DELETE FROM bussig.message in_order WHERE queue_id IN (SELECT queue_id FROM doomed)
          ), gone_groups AS (
              DELETE FROM bussig.message_group WHERE queue_id IN (SELECT queue_id FROM doomed)
          ), gone_keys AS (
              DELETE FROM bussig.dedup WHERE queue_id IN (SELECT queue_id FROM doomed)
          ), recorded AS (
              INSERT INTO bussig.dropped_queue (queue_id) SELECT queue_id FROM doomed
              ON CONFLICT (queue_id) DO UPDATE SET dropped_at = excluded.dropped_at, noticed_at = NULL
          )
          DELETE FROM bussig.queue WHERE queue_id IN (SELECT queue_id FROM doomed) RETURNING queue_id",
    args: &[pg_sys::INT4ARRAYOID],
    writes: true,
};

/// Deletes the messages of `queue_ids` in group order when any of them has groups (see
/// DELETE_IN_GROUP_ORDER): how many. Otherwise none, and the caller's plain DELETE takes them.
fn delete_in_group_order(
    client: &mut SpiClient<'_>,
    queue_ids: &[i32],
) -> BusResult<Option<usize>> {
    if plans::first_value::<bool>(client, &HAS_GROUPS, &[queue_ids.to_vec().into()])? != Some(true)
    {
        return Ok(None);
    }
    Ok(Some(
        plans::run(client, &DELETE_IN_GROUP_ORDER, &[queue_ids.to_vec().into()])?.len(),
    ))
}

static PURGE_QUEUE: Statement = Statement {
    sql: "DELETE FROM bussig.message in_order WHERE queue_id = $1",
    args: &[pg_sys::INT4OID],
    writes: true,
};

// A purged queue's groups are empty.
static PURGE_GROUPS: Statement = Statement {
    sql: "DELETE FROM bussig.message_group WHERE queue_id = $1",
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
    let [a1, a2, a3, a4, a5, a6, a7, a8, a9] = settings.args();
    let args = [
        a1,
        a2,
        a3,
        a4,
        a5,
        a6,
        a7,
        a8,
        a9,
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
    if let Some(found) = super::find(client, name)? {
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
    if super::find(client, queue)?.is_some() {
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
    if settings.max_in_flight.is_some() {
        in_flight::set_cap(client, queue_id, settings.max_in_flight)?;
    }
    let dead_letter_id =
        ensure_dead_letter_queue(client, caller, &dead_letter_name, owned.then_some(queue_id))?;
    plans::run(
        client,
        &SET_DEAD_LETTER_QUEUE,
        &[queue_id.into(), dead_letter_id.into()],
    )?;
    Ok(true)
}

/// Changes the settings of `queue` that `change` names, and its dead-letter queue when one is named.
pub fn alter(
    client: &mut SpiClient<'_>,
    caller: &Caller,
    queue: &str,
    change: SettingsChange,
    dead_letter_queue: Option<&str>,
) -> BusResult<()> {
    caller.require(client, queue, Privilege::Manage)?;
    let Some(row) = plans::run(client, &LOAD_SETTINGS, &[queue.into()])?.next() else {
        return Err(BusError::UnknownQueue(queue.to_string()));
    };
    let current = QueueSettings {
        max_deliveries: plans::filled(&row, 1, "max_deliveries")?,
        lock_timeout: plans::filled(&row, 2, "lock_timeout")?,
        message_ttl: row.get(3)?,
        retry_delay: plans::filled(&row, 4, "retry_delay")?,
        retry_delay_max: plans::filled(&row, 5, "retry_delay_max")?,
        retry_multiplier: plans::filled(&row, 6, "retry_multiplier")?,
        dedup_window: plans::filled(&row, 7, "dedup_window")?,
        notify: plans::filled(&row, 8, "notify")?,
        max_in_flight: row.get(9)?,
    };
    let queue_id: i32 = plans::filled(&row, 10, "queue id")?;
    let current_cap = current.max_in_flight;
    let settings = change.apply(current)?;
    settings.check_notify(queue)?;
    let cap_changed = settings.max_in_flight != current_cap;
    let [a1, a2, a3, a4, a5, a6, a7, a8, a9] = settings.args();
    plans::run(
        client,
        &UPDATE_SETTINGS,
        &[a1, a2, a3, a4, a5, a6, a7, a8, a9, queue_id.into()],
    )?;
    if cap_changed {
        in_flight::set_cap(client, queue_id, settings.max_in_flight)?;
    }
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
pub fn drop_by_id(client: &mut SpiClient<'_>, queue_id: i32) -> BusResult<bool> {
    if dead_letter_users(client, queue_id)?.is_some() {
        return Ok(false);
    }
    let doomed: Vec<i32> =
        plans::first_value(client, &DOOMED, &[queue_id.into()])?.unwrap_or_else(|| vec![queue_id]);
    delete_in_group_order(client, &doomed)?;
    for row in plans::run(client, &DROP_QUEUE, &[doomed.into()])? {
        crate::depth::dropped(plans::filled(&row, 1, "queue id")?);
    }
    Ok(true)
}

/// Drops `queue` if it exists (false otherwise): 2BP01 while other queues send their dead letters to it.
pub fn drop(client: &mut SpiClient<'_>, caller: &Caller, queue: &str) -> BusResult<bool> {
    let Some(found) = super::find(client, queue)? else {
        return Ok(false);
    };
    caller.require(client, queue, Privilege::Manage)?;
    if let Some(users) = dead_letter_users(client, found.queue_id)? {
        return Err(BusError::DeadLetterQueueInUse {
            queue: queue.to_string(),
            users,
        });
    }
    drop_by_id(client, found.queue_id)
}

/// Deletes every message of `queue`: how many.
pub fn purge(client: &mut SpiClient<'_>, caller: &Caller, queue: &str) -> BusResult<i64> {
    caller.require(client, queue, Privilege::Manage)?;
    let found = require(client, queue)?;
    crate::message::group::purge_lock(client, found.queue_id)?;
    let purged = match delete_in_group_order(client, &[found.queue_id])? {
        Some(deleted) => deleted,
        None => plans::run(client, &PURGE_QUEUE, &[found.queue_id.into()])?.len(),
    };
    plans::run(client, &PURGE_GROUPS, &[found.queue_id.into()])?;
    // The slots of the messages purged come free now, not when their locks would have ended.
    in_flight::purged(client, found.queue_id)?;
    crate::depth::removed(found.queue_id, purged);
    Ok(purged as i64)
}
