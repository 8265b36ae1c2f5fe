//! Messages as a consumer gets them, and the calls that settle them: the SQL functions one to one, for
//! those who drive their own loop. `Consumer` builds on these.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row, Statement};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::connection::Current;
use crate::error::{Error, Result};
use crate::sql;
use tokio_postgres::types::Type;

/// The connection a `Consumer` (or `stream`) read a message on, for settling it: the consumer's
/// connection as of now, made anew after a loss.
#[derive(Clone)]
pub(crate) struct Connection {
    pub(crate) client: Current,
    /// Set once the message is settled through it (acked, given back, dead-lettered, replied to):
    /// the consumer then has nothing left to do with it.
    pub(crate) settled: Arc<AtomicBool>,
    /// Set once a reply was sent for it, on any client: that reply's transaction acked it too.
    pub(crate) answered: Arc<AtomicBool>,
    /// Cancelled when the consumer found the lock gone as it came to extend it.
    pub(crate) lock_lost: CancellationToken,
    /// Set once a transaction settles the message (a reply, a transactional handler's ack) and so
    /// holds its row until it ends: an extension then would only wait for that transaction.
    pub(crate) settling: Arc<AtomicBool>,
}

impl Connection {
    pub(crate) fn new(client: Current) -> Self {
        Connection {
            client,
            settled: Arc::default(),
            answered: Arc::default(),
            lock_lost: CancellationToken::new(),
            settling: Arc::default(),
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connection")
    }
}

/// One delivery of a message: its lock token proves the consumer holds it until `lock_timeout` runs out.
#[derive(Clone, Debug)]
pub struct Message<T = Value> {
    pub queue: Arc<str>,
    pub id: i64,
    pub lock_token: Uuid,
    pub subject: Option<String>,
    pub payload: T,
    pub headers: Option<Value>,
    /// 1 on the first delivery.
    pub delivery_count: i32,
    pub priority: i32,
    pub enqueued_at: DateTime<Utc>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// Its ordered group, if it was sent to one.
    pub group_id: Option<String>,
    /// Set on messages a `Consumer` hands its handler.
    pub(crate) connection: Option<Connection>,
}

impl Message<Value> {
    fn from_row(queue: &Arc<str>, row: &Row) -> Self {
        Message {
            queue: queue.clone(),
            id: row.get(0),
            lock_token: row.get(1),
            subject: row.get(2),
            payload: row.get(3),
            headers: row.get(4),
            delivery_count: row.get(5),
            priority: row.get(6),
            enqueued_at: row.get(7),
            correlation_id: row.get(8),
            reply_to: row.get(9),
            group_id: row.try_get(10).ok().flatten(),
            connection: None,
        }
    }

    /// The same delivery with its payload decoded into `T`; on failure, the delivery back with the error.
    #[allow(clippy::result_large_err)]
    pub fn decode<T: DeserializeOwned>(
        self,
    ) -> Result<Message<T>, (Message<Value>, serde_json::Error)> {
        match T::deserialize(&self.payload) {
            Ok(payload) => Ok(self.with_payload(payload)),
            Err(error) => Err((self, error)),
        }
    }
}

impl<T> Message<T> {
    /// A first delivery built by hand, e.g. to unit-test a handler or code that takes messages:
    /// no subject, headers, correlation id or reply-to (set the public fields for those), priority 0,
    /// enqueued now. It is settled only through the functions that take a client.
    pub fn new(queue: &str, id: i64, lock_token: Uuid, payload: T) -> Message<T> {
        Message {
            queue: queue.into(),
            id,
            lock_token,
            subject: None,
            payload,
            headers: None,
            delivery_count: 1,
            priority: 0,
            enqueued_at: Utc::now(),
            correlation_id: None,
            reply_to: None,
            group_id: None,
            connection: None,
        }
    }

    /// This delivery with another payload (for handing it on without cloning the original).
    pub fn with_payload<U>(self, payload: U) -> Message<U> {
        Message {
            queue: self.queue,
            id: self.id,
            lock_token: self.lock_token,
            subject: self.subject,
            payload,
            headers: self.headers,
            delivery_count: self.delivery_count,
            priority: self.priority,
            enqueued_at: self.enqueued_at,
            correlation_id: self.correlation_id,
            reply_to: self.reply_to,
            group_id: self.group_id,
            connection: self.connection,
        }
    }

    /// A header's value as text, when it is a string.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.as_ref()?.get(key)?.as_str()
    }

    /// Cancelled when the `Consumer` that handed this message out came to extend its lock and found
    /// it gone (it ran out, and another reader may be handling the message now): work that the other
    /// delivery will do again can stop, and settling this one returns false. Never cancelled for a
    /// message read by hand.
    ///
    /// ```no_run
    /// # async fn example(m: bussig_client::Message) {
    /// let lost = m.lock_lost();
    /// tokio::select! {
    ///     _ = lost.cancelled() => { /* stop: another delivery takes over */ }
    ///     _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => { /* the work */ }
    /// }
    /// # }
    /// ```
    pub fn lock_lost(&self) -> CancellationToken {
        match &self.connection {
            Some(connection) => connection.lock_lost.clone(),
            None => CancellationToken::new(),
        }
    }

    /// Runs `call` on the connection this message was read with (a `Consumer`'s, made anew after a
    /// loss, or a `stream`'s), for settling it.
    async fn on_its_connection<R, F>(&self, call: impl FnOnce(Arc<Client>) -> F) -> Result<R>
    where
        F: std::future::Future<Output = Result<R>>,
    {
        match &self.connection {
            Some(connection) => connection.client.run(call).await,
            None => Err(Error::NotInState(
                "this message was read by hand: settle it with the functions that take a client"
                    .into(),
            )),
        }
    }

    /// Acks this delivery on the connection it was read with; false when the lock no longer held.
    pub async fn ack(&self) -> Result<bool> {
        let (queue, id, token) = (&self.queue, self.id, self.lock_token);
        let acked = self
            .on_its_connection(|client| async move { ack(&*client, queue, id, token).await })
            .await?;
        Ok(self.settled_if(acked))
    }

    /// Notes that the message was settled on its consumer's connection, when `done`.
    fn settled_if(&self, done: bool) -> bool {
        if done {
            self.mark_settled();
        }
        done
    }

    /// Tells the consumer that the message needs no ack of its own: it was settled, or will be with a
    /// transaction that committed.
    pub(crate) fn mark_settled(&self) {
        if let Some(connection) = &self.connection {
            connection.settled.store(true, Ordering::Release);
        }
    }

    /// Gives it back (see `nack`) on the connection it was read with.
    pub async fn nack(&self, delay: Option<Duration>, error: Option<&str>) -> Result<bool> {
        let (queue, id, token) = (&self.queue, self.id, self.lock_token);
        let given_back = self
            .on_its_connection(|client| async move {
                nack(&*client, queue, id, token, delay, error).await
            })
            .await?;
        Ok(self.settled_if(given_back))
    }

    /// Extends its lock (see `extend_lock`) on the connection it was read with.
    pub async fn extend_lock(&self, lock_timeout: Option<Duration>) -> Result<bool> {
        let (queue, id, token) = (&self.queue, self.id, self.lock_token);
        self.on_its_connection(|client| async move {
            extend_lock(&*client, queue, id, token, lock_timeout).await
        })
        .await
    }

    /// Dead-letters it (see `dead_letter`) on the connection it was read with.
    pub async fn dead_letter(&self, reason: &str, error: Option<&str>) -> Result<bool> {
        let (queue, id, token) = (&self.queue, self.id, self.lock_token);
        let moved = self
            .on_its_connection(|client| async move {
                dead_letter(&*client, queue, id, token, reason, error).await
            })
            .await?;
        Ok(self.settled_if(moved))
    }

    /// Answers this request on the connection its `Consumer` read it with: see `reply`. A message
    /// read by hand has none; use `reply_with` then.
    pub async fn reply<R: Serialize + ?Sized>(&self, payload: &R) -> Result<Option<i64>> {
        let reply = self
            .on_its_connection(|client| async move { self.reply_with(&*client, payload).await })
            .await?;
        self.settled_if(reply.is_some());
        Ok(reply)
    }

    /// Answers this request on `client` (`bussig.reply`): acks it and sends `payload` to its
    /// `reply_to` queue, correlated with it. The reply's id; None when the lock no longer held.
    pub async fn reply_with<C: GenericClient, R: Serialize + ?Sized>(
        &self,
        client: &C,
        payload: &R,
    ) -> Result<Option<i64>> {
        self.mark_settling();
        let reply = reply(client, &self.queue, self.id, self.lock_token, payload, None).await;
        if let Some(connection) = &self.connection {
            match reply {
                Ok(Some(_)) => connection.answered.store(true, Ordering::Release),
                // Not settled after all: its lock is kept again, and its loss told.
                _ => connection.settling.store(false, Ordering::Release),
            }
        }
        reply
    }

    /// Tells the consumer that a transaction is settling the message from now on: it extends the
    /// lock no more.
    pub(crate) fn mark_settling(&self) {
        if let Some(connection) = &self.connection {
            connection.settling.store(true, Ordering::Release);
        }
    }

    /// Whether a reply to it was sent (and acked it) in some transaction.
    pub(crate) fn answered(&self) -> bool {
        self.connection
            .as_ref()
            .is_some_and(|connection| connection.answered.load(Ordering::Acquire))
    }
}

/// Locks up to `max` ready messages (`bussig.read`); with `wait`, waits that long for the first.
pub async fn read<C: GenericClient>(
    client: &C,
    queue: &str,
    max: i32,
    lock_timeout: Option<Duration>,
    wait: Option<Duration>,
) -> Result<Vec<Message>> {
    let rows = sql::query(
        client,
        "SELECT * FROM bussig.read($1, $2, $3, $4)",
        &[Type::TEXT, Type::INT4, Type::INTERVAL, Type::INTERVAL],
        &[
            &queue,
            &max,
            &sql::Interval::of(lock_timeout),
            &sql::Interval::of(wait),
        ],
    )
    .await?;
    let queue: Arc<str> = queue.into();
    Ok(rows
        .iter()
        .map(|row| Message::from_row(&queue, row))
        .collect())
}

/// Acks `acked` (id and token pairs; stale tokens are skipped) and reads the next batch, in one call
/// and one transaction (`bussig.ack_and_read`).
pub async fn ack_and_read<C: GenericClient>(
    client: &C,
    queue: &str,
    acked: &[(i64, Uuid)],
    max: i32,
    lock_timeout: Option<Duration>,
    wait: Option<Duration>,
) -> Result<Vec<Message>> {
    ack_and_read_with(client, None, queue, acked, max, lock_timeout, wait).await
}

const ACK_AND_READ: &str = "SELECT * FROM bussig.ack_and_read($1, $2, $3, $4, $5, $6)";
const ACK_AND_READ_TYPES: [Type; 6] = [
    Type::TEXT,
    Type::INT8_ARRAY,
    Type::UUID_ARRAY,
    Type::INT4,
    Type::INTERVAL,
    Type::INTERVAL,
];

/// `ack_and_read`'s statement, prepared on `client` for `ack_and_read_with`.
pub(crate) async fn prepare_ack_and_read(client: &Client) -> Result<Statement> {
    Ok(client
        .prepare_typed(ACK_AND_READ, &ACK_AND_READ_TYPES)
        .await?)
}

/// `ack_and_read`, through `prepared` (from `prepare_ack_and_read` on this connection) when given.
pub(crate) async fn ack_and_read_with<C: GenericClient>(
    client: &C,
    prepared: Option<&Statement>,
    queue: &str,
    acked: &[(i64, Uuid)],
    max: i32,
    lock_timeout: Option<Duration>,
    wait: Option<Duration>,
) -> Result<Vec<Message>> {
    let (ids, tokens): (Vec<i64>, Vec<Uuid>) = acked.iter().copied().unzip();
    let (lock_timeout, wait) = (sql::Interval::of(lock_timeout), sql::Interval::of(wait));
    let params: [&(dyn ToSql + Sync); 6] = [&queue, &ids, &tokens, &max, &lock_timeout, &wait];
    let rows = match prepared {
        Some(statement) => client.query(statement, &params).await?,
        None => sql::query(client, ACK_AND_READ, &ACK_AND_READ_TYPES, &params).await?,
    };
    let queue: Arc<str> = queue.into();
    Ok(rows
        .iter()
        .map(|row| Message::from_row(&queue, row))
        .collect())
}

/// Deletes a delivered message; false when its lock token no longer holds.
pub async fn ack<C: GenericClient>(client: &C, queue: &str, id: i64, token: Uuid) -> Result<bool> {
    sql::value(
        client,
        "SELECT bussig.ack($1, $2, $3)",
        &[Type::TEXT, Type::INT8, Type::UUID],
        &[&queue, &id, &token],
    )
    .await
}

/// Acks many deliveries; how many still held their lock.
pub async fn ack_batch<C: GenericClient>(
    client: &C,
    queue: &str,
    acked: &[(i64, Uuid)],
) -> Result<i64> {
    let (ids, tokens): (Vec<i64>, Vec<Uuid>) = acked.iter().copied().unzip();
    sql::value(
        client,
        "SELECT bussig.ack_batch($1, $2, $3)",
        &[Type::TEXT, Type::INT8_ARRAY, Type::UUID_ARRAY],
        &[&queue, &ids, &tokens],
    )
    .await
}

/// Gives a delivery back: ready again after `delay` (None: the queue's backoff), with `error` kept as
/// its last error. On the last allowed delivery it goes to the dead-letter queue instead.
pub async fn nack<C: GenericClient>(
    client: &C,
    queue: &str,
    id: i64,
    token: Uuid,
    delay: Option<Duration>,
    error: Option<&str>,
) -> Result<bool> {
    sql::value(
        client,
        "SELECT bussig.nack($1, $2, $3, $4, $5)",
        &[
            Type::TEXT,
            Type::INT8,
            Type::UUID,
            Type::INTERVAL,
            Type::TEXT,
        ],
        &[&queue, &id, &token, &sql::Interval::of(delay), &error],
    )
    .await
}

/// Keeps the lock for `lock_timeout` more from now (None: the queue's lock timeout).
pub async fn extend_lock<C: GenericClient>(
    client: &C,
    queue: &str,
    id: i64,
    token: Uuid,
    lock_timeout: Option<Duration>,
) -> Result<bool> {
    sql::value(
        client,
        "SELECT bussig.extend_lock($1, $2, $3, $4)",
        &[Type::TEXT, Type::INT8, Type::UUID, Type::INTERVAL],
        &[&queue, &id, &token, &sql::Interval::of(lock_timeout)],
    )
    .await
}

/// Moves a delivery to the queue's dead-letter queue now, with a reason and an error text.
pub async fn dead_letter<C: GenericClient>(
    client: &C,
    queue: &str,
    id: i64,
    token: Uuid,
    reason: &str,
    error: Option<&str>,
) -> Result<bool> {
    sql::value(
        client,
        "SELECT bussig.dead_letter($1, $2, $3, $4, $5)",
        &[Type::TEXT, Type::INT8, Type::UUID, Type::TEXT, Type::TEXT],
        &[&queue, &id, &token, &reason, &error],
    )
    .await
}

/// Deliveries of `queue` one by one, for those who drive the loop themselves: reads up to `batch` at a
/// time, waiting up to `wait` when none is ready (the stream never ends by itself). Each message is
/// settled with its own `ack`, `nack`, `extend_lock`, `dead_letter` or `reply`, on `client`. Messages
/// read but not yet taken from a dropped stream stay locked until their lock runs out: keep `batch`
/// small for a slow loop.
pub fn stream(
    client: Arc<Client>,
    queue: &str,
    batch: i32,
    lock_timeout: Option<Duration>,
    wait: Duration,
) -> impl futures_util::Stream<Item = Result<Message>> {
    let queue: Arc<str> = queue.into();
    let pending = std::collections::VecDeque::<Message>::new();
    futures_util::stream::unfold(
        (client, queue, pending),
        move |(client, queue, mut pending)| async move {
            while pending.is_empty() {
                match read(&*client, &queue, batch, lock_timeout, Some(wait)).await {
                    Ok(messages) => pending.extend(messages),
                    Err(error) => return Some((Err(error), (client, queue, pending))),
                }
            }
            let mut message = pending.pop_front().expect("not empty");
            message.connection = Some(Connection::new(Current::fixed(client.clone())));
            Some((Ok(message), (client, queue, pending)))
        },
    )
}

/// Acks a request and sends its reply to the request's `reply_to` queue in one call (`bussig.reply`):
/// the reply's id, or None when the lock no longer held. `NotInState` when the request names no
/// `reply_to`, `UnknownQueue` when that queue does not exist; the request is not acked then.
pub async fn reply<C: GenericClient, R: Serialize + ?Sized>(
    client: &C,
    queue: &str,
    id: i64,
    token: Uuid,
    payload: &R,
    headers: Option<&serde_json::Map<String, Value>>,
) -> Result<Option<i64>> {
    let payload = serde_json::to_value(payload)?;
    let headers = headers.cloned().map(Value::Object);
    sql::value(
        client,
        "SELECT bussig.reply($1, $2, $3, $4, $5)",
        &[Type::TEXT, Type::INT8, Type::UUID, Type::JSONB, Type::JSONB],
        &[&queue, &id, &token, &payload, &headers],
    )
    .await
}

/// How many messages the queue holds (`bussig.queue_depth`): exact, and cheap to poll.
pub async fn queue_depth<C: GenericClient>(client: &C, queue: &str) -> Result<i64> {
    sql::value(
        client,
        "SELECT bussig.queue_depth($1)",
        &[Type::TEXT],
        &[&queue],
    )
    .await
}
