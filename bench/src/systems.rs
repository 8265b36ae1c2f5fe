//! The four queues under test and the statements each one is driven with. Every statement is
//! prepared once per connection, as an application would.

use postgres::types::Type;
use postgres::Client;
use uuid::Uuid;

use crate::pg::{payloads, JsonbText, Received, Res, Stamp, PAYLOAD};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum System {
    Bussig,
    Hand,
    Pgq,
    Pgmq,
}

pub const SYSTEMS: [System; 4] = [System::Bussig, System::Hand, System::Pgq, System::Pgmq];
pub const PEERS: [System; 3] = [System::Hand, System::Pgq, System::Pgmq];
/// The systems of the workloads pgmq does not take part in (end to end, the soak).
pub const WITHOUT_PGMQ: [System; 3] = [System::Bussig, System::Hand, System::Pgq];

pub const QUEUE: &str = "bench";
pub const PGQ_CONSUMER: &str = "bench_consumer";

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Bussig => "bussig",
            System::Hand => "hand-written",
            System::Pgq => "PgQ",
            System::Pgmq => "pgmq",
        }
    }
}

/// Takes each row's payload off the wire as a client would, without decoding it.
pub fn receive(rows: &[postgres::Row], column: usize) -> usize {
    rows.iter()
        .map(|row| row.get::<_, Received>(column).0)
        .sum()
}

/// One step of a client's loop: how many messages it moved (0 when there was nothing to do).
pub type Step = Box<dyn FnMut(&mut Client) -> Res<u64>>;

/// A message id and how to settle it.
pub type Delivery = (i64, Option<Uuid>);

/// Empties a system's queue and its storage, so that one workload does not skew the next.
pub fn reset(admin: &mut Client, system: System) -> Res<()> {
    match system {
        System::Bussig => {
            // The worker may be writing a fan-out into these tables and deadlock with the TRUNCATE; one of
            // the two gives way, and the worker retries on its own.
            let mut attempts = 0;
            while let Err(error) = admin
                .batch_execute("TRUNCATE bussig.message, bussig.body, bussig.fanout, bussig.dedup")
            {
                attempts += 1;
                if attempts == 5
                    || error.code() != Some(&postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
                {
                    return Err(error.into());
                }
            }
            vacuum(admin, system)?;
            ensure_bussig_queue(admin, QUEUE, false)?;
        }
        System::Hand => {
            admin.batch_execute("TRUNCATE hand.queue RESTART IDENTITY")?;
            vacuum(admin, system)?;
        }
        System::Pgq => {
            // Dropping the queue drops its event tables: nothing is left of the previous workload.
            let exists: bool = admin
                .query_one(
                    "SELECT EXISTS (SELECT FROM pgq.queue WHERE queue_name = $1)",
                    &[&QUEUE],
                )?
                .get(0);
            if exists {
                admin.execute("SELECT pgq.drop_queue($1, true)", &[&QUEUE])?;
            }
            admin.execute("SELECT pgq.create_queue($1)", &[&QUEUE])?;
            admin.execute(
                "SELECT pgq.register_consumer($1, $2)",
                &[&QUEUE, &PGQ_CONSUMER],
            )?;
        }
        System::Pgmq => crate::pgmq::recreate(admin, QUEUE)?,
    }
    Ok(())
}

pub fn ensure_bussig_queue(admin: &mut Client, name: &str, notify: bool) -> Res<()> {
    admin.execute(
        "SELECT bussig.create_queue($1, notify => $2)",
        &[&name, &notify],
    )?;
    Ok(())
}

/// PgQ ticks only on a ticker's call; these settings make a tick follow new events within
/// `lag` (pgqd's defaults: 500 events or 3 seconds).
pub fn pgq_ticker_settings(admin: &mut Client, lag: &str) -> Res<()> {
    admin.execute(
        "SELECT pgq.set_queue_config($1, 'ticker_max_lag', $2)",
        &[&QUEUE, &lag],
    )?;
    admin.execute(
        "SELECT pgq.set_queue_config($1, 'ticker_idle_period', $2)",
        &[&QUEUE, &lag],
    )?;
    Ok(())
}

/// Fills a queue with `count` ready messages using each system's fastest bulk path, then vacuums and
/// analyzes so every system starts from clean, counted tables.
pub fn prefill(admin: &mut Client, system: System, count: i64) -> Res<()> {
    fill(admin, system, QUEUE, count)?;
    vacuum(admin, system)
}

/// Sends `count` messages to `queue` in bulk (bussig and pgmq in calls of 10,000), nothing more.
pub fn fill(admin: &mut Client, system: System, queue: &str, count: i64) -> Res<()> {
    let chunk: i64 = match system {
        System::Bussig | System::Pgmq => 10_000,
        System::Hand => count.max(1),
        // PgQ batches are what lies between two ticks; pgqd ticks every 500 events by default.
        System::Pgq => 500,
    };
    let mut left = count;
    while left > 0 {
        let n = left.min(chunk);
        match system {
            System::Bussig => {
                admin.execute(
                    "SELECT count(*) FROM bussig.send_batch($1, array(SELECT $2::text::jsonb FROM generate_series(1, $3::bigint)))",
                    &[&queue, &PAYLOAD, &n],
                )?;
            }
            System::Pgmq => {
                admin.execute(
                    "SELECT count(*) FROM pgmq.send_batch($1, array(SELECT $2::text::jsonb FROM generate_series(1, $3::bigint)))",
                    &[&queue, &PAYLOAD, &n],
                )?;
            }
            System::Hand => {
                admin.execute(
                    "INSERT INTO hand.queue (payload) SELECT $1::text::jsonb FROM generate_series(1, $2::bigint)",
                    &[&PAYLOAD, &n],
                )?;
            }
            System::Pgq => {
                admin.execute(
                    "SELECT count(pgq.insert_event($1, 'bench', $2)) FROM generate_series(1, $3::bigint)",
                    &[&queue, &PAYLOAD, &n],
                )?;
                admin.execute("SELECT pgq.ticker($1)", &[&queue])?;
            }
        }
        left -= n;
    }
    Ok(())
}

pub fn vacuum(admin: &mut Client, system: System) -> Res<()> {
    match system {
        System::Bussig => admin.batch_execute("VACUUM (ANALYZE) bussig.message, bussig.body")?,
        System::Hand => admin.batch_execute("VACUUM (ANALYZE) hand.queue")?,
        System::Pgq => {
            for table in pgq_tables(admin)? {
                admin.batch_execute(&format!("VACUUM (ANALYZE) {table}"))?;
            }
        }
        System::Pgmq => {
            for table in crate::pgmq::tables(admin, QUEUE)? {
                admin.batch_execute(&format!("VACUUM (ANALYZE) {table}"))?;
            }
        }
    }
    Ok(())
}

fn pgq_tables(admin: &mut Client) -> Res<Vec<String>> {
    let rows = admin.query(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind = 'r' AND n.nspname = 'pgq'
            AND c.relname LIKE 'event\\_' || (SELECT queue_id FROM pgq.queue WHERE queue_name = $1) || '%'",
        &[&QUEUE],
    )?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Bytes on disk of a system's message storage, indexes and TOAST included.
pub fn storage_size(admin: &mut Client, system: System) -> Res<i64> {
    let sql = match system {
        System::Bussig => {
            "SELECT pg_total_relation_size('bussig.message') + pg_total_relation_size('bussig.body')"
        }
        System::Hand => "SELECT pg_total_relation_size('hand.queue')",
        System::Pgq => {
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'r' AND n.nspname = 'pgq'
                AND c.relname LIKE 'event\\_' || (SELECT queue_id FROM pgq.queue WHERE queue_name = 'bench') || '%'"
        }
        System::Pgmq => {
            "SELECT pg_total_relation_size('pgmq.q_bench') + pg_total_relation_size('pgmq.a_bench')"
        }
    };
    Ok(admin.query_one(sql, &[])?.get(0))
}

/// Sends one message per transaction, returning its id.
pub struct Sender {
    statement: postgres::Statement,
    system: System,
    queue: String,
}

impl Sender {
    pub fn new(client: &mut Client, system: System, queue: &str, want_id: bool) -> Res<Self> {
        let statement = match system {
            System::Bussig => {
                client.prepare_typed("SELECT bussig.send($1, $2)", &[Type::TEXT, Type::JSONB])?
            }
            System::Hand if want_id => client.prepare_typed(
                "INSERT INTO hand.queue (payload) VALUES ($1) RETURNING id",
                &[Type::JSONB],
            )?,
            System::Hand => client.prepare_typed(
                "INSERT INTO hand.queue (payload) VALUES ($1)",
                &[Type::JSONB],
            )?,
            System::Pgq => client.prepare_typed(
                "SELECT pgq.insert_event($1, 'bench', $2)",
                &[Type::TEXT, Type::TEXT],
            )?,
            System::Pgmq => {
                client.prepare_typed("SELECT pgmq.send($1, $2)", &[Type::TEXT, Type::JSONB])?
            }
        };
        Ok(Sender {
            statement,
            system,
            queue: queue.to_string(),
        })
    }

    pub fn send(&self, client: &mut Client) -> Res<Option<i64>> {
        self.send_text(client, PAYLOAD)
    }

    /// Sends a payload of the caller's, e.g. a `Stamp`'s.
    pub fn send_text(&self, client: &mut Client, text: &str) -> Res<Option<i64>> {
        let payload = JsonbText(text);
        let rows = match self.system {
            System::Bussig | System::Pgmq => {
                client.query(&self.statement, &[&self.queue, &payload])?
            }
            System::Hand => client.query(&self.statement, &[&payload])?,
            System::Pgq => client.query(&self.statement, &[&self.queue, &text])?,
        };
        Ok(rows.first().map(|row| row.get(0)))
    }

    pub fn step(self) -> Step {
        Box::new(move |client| self.send(client).map(|_| 1))
    }
}

/// Sends `size` messages in one statement and one transaction.
pub fn batch_sender(client: &mut Client, system: System, size: usize) -> Res<Step> {
    let jsonb_batch = payloads(size);
    let text_batch = vec![PAYLOAD; size];
    Ok(match system {
        System::Bussig => {
            let statement = client.prepare_typed(
                "SELECT count(*) FROM bussig.send_batch($1, $2)",
                &[Type::TEXT, Type::JSONB_ARRAY],
            )?;
            Box::new(move |c| {
                c.query_one(&statement, &[&QUEUE, &jsonb_batch])?;
                Ok(size as u64)
            })
        }
        System::Hand => {
            let statement = client.prepare_typed(
                "INSERT INTO hand.queue (payload) SELECT unnest($1::jsonb[])",
                &[Type::JSONB_ARRAY],
            )?;
            Box::new(move |c| {
                c.execute(&statement, &[&jsonb_batch])?;
                Ok(size as u64)
            })
        }
        System::Pgq => {
            let statement = client.prepare_typed(
                "SELECT count(pgq.insert_event($1, 'bench', event)) FROM unnest($2::text[]) event",
                &[Type::TEXT, Type::TEXT_ARRAY],
            )?;
            Box::new(move |c| {
                c.query_one(&statement, &[&QUEUE, &text_batch])?;
                Ok(size as u64)
            })
        }
        System::Pgmq => {
            let statement = client.prepare_typed(
                "SELECT count(*) FROM pgmq.send_batch($1, $2)",
                &[Type::TEXT, Type::JSONB_ARRAY],
            )?;
            Box::new(move |c| {
                c.query_one(&statement, &[&QUEUE, &jsonb_batch])?;
                Ok(size as u64)
            })
        }
    })
}

/// A consumer: locks up to `max` messages in one transaction and settles them in the next (bussig,
/// pgmq and the hand-written queue), or takes the next batch between two ticks and finishes it (PgQ,
/// which has one reader per batch and no per-message ack).
pub struct Consumer {
    system: System,
    queue: String,
    max: i32,
    read: postgres::Statement,
    ack: postgres::Statement,
    pgq_events: Option<postgres::Statement>,
}

/// What a read locked: the ids, bussig's lock tokens.
pub struct Locked {
    ids: Vec<i64>,
    tokens: Vec<Uuid>,
}

impl Locked {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }
    /// bussig's lock tokens; empty for the other systems.
    pub fn tokens(&self) -> &[Uuid] {
        &self.tokens
    }
}

impl Consumer {
    /// `wait_ms`: bussig's read waits that long for work when the queue is empty (long poll), pgmq's
    /// `read_with_poll` polls every 10 ms for as many whole seconds; the hand-written read returns.
    pub fn new(
        client: &mut Client,
        system: System,
        queue: &str,
        max: i32,
        wait_ms: Option<u32>,
    ) -> Res<Self> {
        Self::with_lock(client, system, queue, max, wait_ms, None)
    }

    /// As `new`, with messages locked for `lock_seconds` instead of 30 (bussig: the queue's own
    /// lock timeout, 30 seconds unless altered).
    pub fn with_lock(
        client: &mut Client,
        system: System,
        queue: &str,
        max: i32,
        wait_ms: Option<u32>,
        lock_seconds: Option<u32>,
    ) -> Res<Self> {
        let seconds = lock_seconds.unwrap_or(30);
        let (read, ack, pgq_events) = match system {
            System::Bussig => {
                let wait = wait_ms
                    .map(|ms| format!(", wait => '{ms} milliseconds'"))
                    .unwrap_or_default();
                let lock = lock_seconds
                    .map(|s| format!(", lock_timeout => '{s} seconds'"))
                    .unwrap_or_default();
                (
                    client.prepare_typed(
                        &format!(
                            "SELECT message_id, lock_token, payload FROM bussig.read($1, $2{lock}{wait})"
                        ),
                        &[Type::TEXT, Type::INT4],
                    )?,
                    client.prepare_typed(
                        "SELECT bussig.ack_batch($1, $2, $3)",
                        &[Type::TEXT, Type::INT8_ARRAY, Type::UUID_ARRAY],
                    )?,
                    None,
                )
            }
            System::Hand => (
                client.prepare_typed(
                    &format!(
                        "UPDATE hand.queue SET visible_at = now() + interval '{seconds} seconds'
                          WHERE id IN (SELECT id FROM hand.queue WHERE visible_at <= now()
                                        ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                          RETURNING id, payload"
                    ),
                    &[Type::INT8],
                )?,
                client.prepare_typed(
                    "DELETE FROM hand.queue WHERE id = ANY($1)",
                    &[Type::INT8_ARRAY],
                )?,
                None,
            ),
            System::Pgq => (
                client.prepare_typed("SELECT pgq.next_batch($1, $2)", &[Type::TEXT, Type::TEXT])?,
                client.prepare_typed("SELECT pgq.finish_batch($1)", &[Type::INT8])?,
                Some(client.prepare_typed(
                    "SELECT ev_id, ev_data FROM pgq.get_batch_events($1)",
                    &[Type::INT8],
                )?),
            ),
            // The same visibility timeout as the hand-written queue.
            System::Pgmq => (
                match wait_ms {
                    Some(ms) => client.prepare_typed(
                        &format!(
                            "SELECT msg_id, message FROM pgmq.read_with_poll($1, {seconds}, $2, {}, 10)",
                            ms.div_ceil(1000).max(1)
                        ),
                        &[Type::TEXT, Type::INT4],
                    )?,
                    None => client.prepare_typed(
                        &format!("SELECT msg_id, message FROM pgmq.read($1, {seconds}, $2)"),
                        &[Type::TEXT, Type::INT4],
                    )?,
                },
                client.prepare_typed(
                    "SELECT count(*) FROM pgmq.delete($1, $2)",
                    &[Type::TEXT, Type::INT8_ARRAY],
                )?,
                None,
            ),
        };
        Ok(Consumer {
            system,
            queue: queue.to_string(),
            max,
            read,
            ack,
            pgq_events,
        })
    }

    /// The rows of one read and the column of their payload.
    fn read_rows(&self, client: &mut Client) -> Res<(Vec<postgres::Row>, usize)> {
        Ok(match self.system {
            System::Bussig => (client.query(&self.read, &[&self.queue, &self.max])?, 2),
            System::Hand => (client.query(&self.read, &[&(self.max as i64)])?, 1),
            System::Pgmq => (client.query(&self.read, &[&self.queue, &self.max])?, 1),
            System::Pgq => unreachable!("a PgQ batch is read and finished in one transaction"),
        })
    }

    fn locked(&self, rows: &[postgres::Row]) -> Locked {
        Locked {
            ids: rows.iter().map(|r| r.get(0)).collect(),
            tokens: if self.system == System::Bussig {
                rows.iter().map(|r| r.get(1)).collect()
            } else {
                Vec::new()
            },
        }
    }

    /// Locks up to `max` messages in one autocommit transaction (not PgQ).
    pub fn read(&self, client: &mut Client) -> Res<Locked> {
        let (rows, payload) = self.read_rows(client)?;
        receive(&rows, payload);
        Ok(self.locked(&rows))
    }

    /// As `read`, for payloads a `Stamp` wrote: also their stamps, in the order of the ids.
    pub fn read_stamped(&self, client: &mut Client) -> Res<(Locked, Vec<Stamp>)> {
        let (rows, payload) = self.read_rows(client)?;
        let stamps = rows
            .iter()
            .map(|row| row.try_get(payload))
            .collect::<Result<_, _>>()?;
        Ok((self.locked(&rows), stamps))
    }

    /// Acknowledges what `read` locked, in the next autocommit transaction.
    pub fn settle(&self, client: &mut Client, locked: Locked) -> Res<Vec<Delivery>> {
        if locked.ids.is_empty() {
            return Ok(Vec::new());
        }
        match self.system {
            System::Bussig => {
                client.query_one(&self.ack, &[&self.queue, &locked.ids, &locked.tokens])?;
                return Ok(locked
                    .ids
                    .into_iter()
                    .zip(locked.tokens.into_iter().map(Some))
                    .collect());
            }
            System::Hand => client.execute(&self.ack, &[&locked.ids]).map(|_| ())?,
            System::Pgmq => client
                .query_one(&self.ack, &[&self.queue, &locked.ids])
                .map(|_| ())?,
            System::Pgq => unreachable!("a PgQ batch is read and finished in one transaction"),
        }
        Ok(locked.ids.into_iter().map(|id| (id, None)).collect())
    }

    /// Takes and settles one batch; returns what it settled.
    pub fn consume(&self, client: &mut Client) -> Res<Vec<Delivery>> {
        if self.system != System::Pgq {
            let locked = self.read(client)?;
            return self.settle(client, locked);
        }
        let mut transaction = client.transaction()?;
        let batch: Option<i64> = transaction
            .query_one(&self.read, &[&self.queue, &PGQ_CONSUMER])?
            .get(0);
        let Some(batch) = batch else {
            transaction.commit()?;
            return Ok(Vec::new());
        };
        let events = self
            .pgq_events
            .as_ref()
            .expect("PgQ consumer prepares get_batch_events");
        let rows = transaction.query(events, &[&batch])?;
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        receive(&rows, 1);
        transaction.query_one(&self.ack, &[&batch])?;
        transaction.commit()?;
        Ok(ids.into_iter().map(|id| (id, None)).collect())
    }

    pub fn step(self) -> Step {
        Box::new(move |client| Ok(self.consume(client)?.len() as u64))
    }
}

/// bussig's consumer loop in one call: settles the previous batch and locks the next.
pub fn ack_and_read_step(client: &mut Client, queue: &str, max: i32) -> Res<Step> {
    let statement = client.prepare_typed(
        "SELECT message_id, lock_token, payload FROM bussig.ack_and_read($1, $2, $3, $4)",
        &[Type::TEXT, Type::INT8_ARRAY, Type::UUID_ARRAY, Type::INT4],
    )?;
    let queue = queue.to_string();
    let mut held: (Option<Vec<i64>>, Option<Vec<Uuid>>) = (None, None);
    Ok(Box::new(move |c| {
        let rows = c.query(&statement, &[&queue, &held.0, &held.1, &max])?;
        receive(&rows, 2);
        let count = rows.len() as u64;
        held = (
            Some(rows.iter().map(|r| r.get(0)).collect()),
            Some(rows.iter().map(|r| r.get(1)).collect()),
        );
        Ok(count)
    }))
}

/// Does what pgqd does: PgQ's ticker every `period` and its maintenance (table rotation, vacuum) every
/// `maintenance_every` ticks, while `running` is set.
pub fn pgq_ticker(
    url: &str,
    period: std::time::Duration,
    maintenance_every: u32,
    running: &std::sync::atomic::AtomicBool,
) -> Res<()> {
    let mut client = crate::pg::connect(url)?;
    let mut round = 0u32;
    while running.load(std::sync::atomic::Ordering::Relaxed) {
        client.execute("SELECT pgq.ticker()", &[])?;
        round += 1;
        if maintenance_every > 0 && round.is_multiple_of(maintenance_every) {
            let operations = client.query(
                "SELECT func_name, func_arg FROM pgq.maint_operations()",
                &[],
            )?;
            for operation in operations {
                let function: String = operation.get(0);
                let argument: Option<String> = operation.get(1);
                // Names come from pgq.maint_operations() itself, the way pgqd calls them.
                match argument {
                    Some(table) if function == "vacuum" => client
                        .batch_execute(&format!("VACUUM {table}"))
                        .map(|_| 0)?,
                    Some(argument) => {
                        client.execute(&format!("SELECT {function}($1)"), &[&argument])?
                    }
                    None => client.execute(&format!("SELECT {function}()"), &[])?,
                };
            }
        }
        std::thread::sleep(period);
    }
    Ok(())
}
