"""``Bus``: sending, publishing and request/reply, for threaded code. Calls without ``conn`` run on a
pooled connection, each in its own transaction; with ``conn`` they run in the caller's transaction and
commit or roll back with the caller's own writes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

import psycopg
from psycopg_pool import ConnectionPool

from . import _sql, errors
from ._connections import Row, caller_connection, connect, execute
from ._core import RECONNECT_FIRST, next_pause
from ._sql import Seconds
from .message import Message, fields
from .stream import StreamRecord, records

EPHEMERAL_TTL = 60.0
"""How long a process's own queue outlives its last heartbeat; heartbeats come three times as often."""
REPLY_WAIT = 1.0
"""How long one read of the reply queue waits: also how late its reader notices a stop."""
STREAM_LEASE = 30.0
"""How long a stream read leases the partitions it returns records from, by default (seconds)."""


def ephemeral_queue(kind: str) -> str:
    return f"bussig_{kind}_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class BlockedGroup:
    """An ordered group whose head is not ready, so the rest of the group waits behind it."""

    group_id: str
    head_message_id: int
    state: str
    """``locked`` (a consumer holds it), ``retry`` (nacked, waiting for its retry) or ``delayed``."""
    since: datetime
    """When the head was sent."""


def blocked_groups(rows: list[Row]) -> list[BlockedGroup]:
    return [BlockedGroup(*row) for row in rows]


class Bus:
    """A database with bussig, for threaded code. Thread-safe; ``close()`` (or ``with``) when done."""

    def __init__(self, conninfo: str, *, max_connections: int = 10) -> None:
        self.conninfo = conninfo
        self._pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
            conninfo,
            min_size=0,
            max_size=max(1, max_connections),
            kwargs={"autocommit": True, "prepare_threshold": None},
            open=True,
        )
        self._requester: Optional[_Requester] = None
        self._requester_lock = threading.Lock()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops the requester (dropping its reply queue) and closes the pool."""
        with self._requester_lock:
            requester, self._requester = self._requester, None
        if requester is not None:
            requester.stop()
        self._pool.close()

    def execute(self, sql: str, params: tuple[Any, ...] = (), conn: Any = None) -> list[Row]:
        """Runs one statement, on ``conn`` or a pooled connection."""
        if conn is not None:
            return execute(caller_connection(conn), sql, params)
        with self._pool.connection() as pooled:
            return execute(pooled, sql, params)

    def send(
        self,
        queue: str,
        payload: Any,
        *,
        headers: Optional[Mapping[str, Any]] = None,
        delay: Optional[Seconds] = None,
        priority: int = 0,
        dedup_id: Optional[str] = None,
        correlation_id: Optional[str] = None,
        reply_to: Optional[str] = None,
        group_id: Optional[str] = None,
        conn: Any = None,
    ) -> Optional[int]:
        """Sends one message; its id, or None when ``dedup_id`` found it a duplicate. Messages with the
        same ``group_id`` are delivered one at a time, in send order."""
        params = _sql.message_params(
            queue, payload, headers, delay, priority, dedup_id, correlation_id, reply_to, group_id
        )
        value: Optional[int] = self.execute(_sql.SEND, params, conn)[0][0]
        return value

    def publish(
        self,
        subject: str,
        payload: Any,
        *,
        headers: Optional[Mapping[str, Any]] = None,
        delay: Optional[Seconds] = None,
        priority: int = 0,
        dedup_id: Optional[str] = None,
        correlation_id: Optional[str] = None,
        reply_to: Optional[str] = None,
        group_id: Optional[str] = None,
        conn: Any = None,
    ) -> int:
        """Publishes to every queue subscribed to a pattern the subject matches; how many got it."""
        params = _sql.message_params(
            subject, payload, headers, delay, priority, dedup_id, correlation_id, reply_to, group_id
        )
        value: int = self.execute(_sql.PUBLISH, params, conn)[0][0]
        return value

    def queue_depth(self, queue: str, conn: Any = None) -> int:
        """How many messages the queue holds: ready, delayed and locked."""
        value: int = self.execute(_sql.QUEUE_DEPTH, (queue,), conn)[0][0]
        return value

    def blocked_groups(self, queue: str, conn: Any = None) -> list[BlockedGroup]:
        """The queue's ordered groups whose head is locked, waiting for a retry, or delayed."""
        return blocked_groups(self.execute(_sql.BLOCKED_GROUPS, (queue,), conn))

    def append(
        self,
        stream: str,
        payload: Any,
        *,
        subject: Optional[str] = None,
        headers: Optional[Mapping[str, Any]] = None,
        key: Optional[str] = None,
        conn: Any = None,
    ) -> int:
        """Appends one record to ``stream``; the partition it went to (its key's, or the next in turn
        without a key). Not its seq: a record is numbered when it becomes readable, after the commit."""
        value: int = self.execute(_sql.APPEND, _sql.append_params(stream, payload, subject, headers, key), conn)[0][0]
        return value

    def append_batch(
        self,
        stream: str,
        payloads: Sequence[Any],
        *,
        subjects: Optional[Sequence[Optional[str]]] = None,
        headers: Optional[Mapping[str, Any]] = None,
        keys: Optional[Sequence[Optional[str]]] = None,
        conn: Any = None,
    ) -> int:
        """Appends records in one statement; how many. ``subjects`` and ``keys``, when given, have one
        entry (or None) per payload; ``headers`` is one object, every record's. Without keys the
        whole batch goes to one partition."""
        params = _sql.append_batch_params(stream, payloads, subjects, headers, keys)
        value: int = self.execute(_sql.APPEND_BATCH, params, conn)[0][0]
        return value

    def stream_read(
        self,
        stream: str,
        group: str,
        max_records: int = 100,
        wait: Optional[Seconds] = None,
        lease: Seconds = STREAM_LEASE,
        conn: Any = None,
    ) -> list[StreamRecord]:
        """Up to ``max_records`` records after the group's position, from partitions no member of the
        group holds, each such partition leased for ``lease``. With ``wait``, an empty read waits that
        long for an append. Commit each partition's last processed seq with ``stream_commit``."""
        params = (stream, group, max_records, _sql.seconds(wait), _sql.seconds(lease))
        return records(stream, group, self.execute(_sql.STREAM_READ, params, conn))

    def stream_commit(
        self, stream: str, group: str, partition: int, seq: int, lease_token: uuid.UUID, conn: Any = None
    ) -> bool:
        """Marks the partition processed up to and including ``seq`` and ends the lease. False on a
        stale lease (another member has leased the partition since): those records are read again."""
        value: bool = self.execute(_sql.STREAM_COMMIT, (stream, group, partition, seq, lease_token), conn)[0][0]
        return value

    def stream_extend_lease(
        self,
        stream: str,
        group: str,
        partition: int,
        lease_token: uuid.UUID,
        lease: Seconds = STREAM_LEASE,
        conn: Any = None,
    ) -> bool:
        """Keeps the partition's lease for ``lease`` more from now (a slow handler's heartbeat). False
        when another member has leased the partition since: stop handling its records."""
        params = (stream, group, partition, lease_token, _sql.seconds(lease))
        value: bool = self.execute(_sql.STREAM_EXTEND_LEASE, params, conn)[0][0]
        return value

    def stream_release(
        self, stream: str, group: str, partition: int, lease_token: uuid.UUID, conn: Any = None
    ) -> bool:
        """Ends the partition's lease without moving the group's position: any member reads those
        records again at once. False when another member has leased the partition since."""
        value: bool = self.execute(_sql.STREAM_RELEASE, (stream, group, partition, lease_token), conn)[0][0]
        return value

    def stream_seek(self, stream: str, group: str, partition: int, seq: int, conn: Any = None) -> None:
        """The group's next read of ``partition`` starts at ``seq`` (1 is the first record)."""
        self.execute(_sql.STREAM_SEEK, (stream, group, partition, seq), conn)

    def stream_seek_time(self, stream: str, group: str, at: datetime, conn: Any = None) -> None:
        """Every partition of the group to its first record appended at or after ``at``."""
        self.execute(_sql.STREAM_SEEK_TIME, (stream, group, at), conn)

    def request(self, queue: str, payload: Any, timeout: Seconds = 30.0, **options: Any) -> Message:
        """Sends ``payload`` to ``queue`` with ``reply_to`` set to this process's reply queue and waits
        up to ``timeout`` for the reply; ``RequestTimeout`` when none came."""
        return self._ask(timeout, lambda more: self.send(queue, payload, **options, **more))

    def request_subject(self, subject: str, payload: Any, timeout: Seconds = 30.0, **options: Any) -> Message:
        """As ``request``, published on ``subject``: the first reply of whoever subscribed wins."""
        return self._ask(timeout, lambda more: self.publish(subject, payload, **options, **more))

    def _ask(self, timeout: Seconds, send: Any) -> Message:
        requester = self._started_requester()
        correlation_id = str(uuid.uuid4())
        waiter = requester.expect(correlation_id)
        seconds = _sql.seconds(timeout)
        try:
            send({"reply_to": requester.queue, "correlation_id": correlation_id})
            return waiter.result(seconds)
        except FutureTimeout:
            raise errors.RequestTimeout(seconds or 0.0) from None
        finally:
            requester.forget(correlation_id)

    def _started_requester(self) -> _Requester:
        with self._requester_lock:
            if self._requester is None:
                self._requester = _Requester(self.conninfo)
            return self._requester


def reply_queue_subscription(queue: str) -> tuple[str, str, float]:
    """``SUBSCRIBE``'s parameters for a reply queue. Nothing publishes on its subject: subscribing with
    a ttl is how a queue becomes ephemeral, and how it is made again when the worker dropped it."""
    return (queue, f"_bussig.reply.{queue}", EPHEMERAL_TTL)


class _Requester:
    """This process's reply queue (ephemeral: the worker drops it once its heartbeats stop) and the
    thread that long-polls it, acks each reply and hands it to the request waiting for it. The thread
    connects again after the database was lost, and makes the queue again if the worker dropped it
    meanwhile; requests in flight then time out."""

    def __init__(self, conninfo: str) -> None:
        self.queue = ephemeral_queue("reply")
        self._conninfo = conninfo
        self._conn = connect(conninfo, "bussig requester")
        execute(self._conn, _sql.SUBSCRIBE, reply_queue_subscription(self.queue))
        self._waiting: dict[str, Future[Message]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._read, name="bussig-replies", daemon=True)
        self._thread.start()

    def expect(self, correlation_id: str) -> Future[Message]:
        waiter: Future[Message] = Future()
        with self._lock:
            self._waiting[correlation_id] = waiter
        return waiter

    def forget(self, correlation_id: str) -> None:
        with self._lock:
            self._waiting.pop(correlation_id, None)

    def _read(self) -> None:
        acks: list[_sql.Ack] = []
        beat = 0.0
        pause = RECONNECT_FIRST
        while not self._stopping.is_set():
            try:
                if self._conn.closed or self._conn.broken:
                    self._conn = connect(self._conninfo, "bussig requester")
                    beat = 0.0
                if time.monotonic() - beat >= EPHEMERAL_TTL / 3:
                    execute(self._conn, _sql.HEARTBEAT, (self.queue,))
                    beat = time.monotonic()
                params = _sql.ack_and_read_params(self.queue, acks, 100, None, REPLY_WAIT)
                rows = execute(self._conn, _sql.ACK_AND_READ, params)
            except errors.UnknownQueue:
                acks = []
                try:
                    execute(self._conn, _sql.SUBSCRIBE, reply_queue_subscription(self.queue))
                    beat = time.monotonic()
                except Exception:
                    self._stopping.wait(REPLY_WAIT)
                continue
            except Exception as error:
                # Acks sent with a lost call go again: stale tokens are skipped.
                if errors.connection_lost(error, self._conn):
                    self._stopping.wait(pause)
                    pause = next_pause(pause)
                else:
                    self._stopping.wait(REPLY_WAIT)
                continue
            pause = RECONNECT_FIRST
            replies = [Message(**fields(self.queue, row)) for row in rows]
            acks = [(reply.message_id, reply.lock_token) for reply in replies]
            for reply in replies:
                with self._lock:
                    waiter = self._waiting.pop(reply.correlation_id or "", None)
                if waiter is not None:
                    waiter.set_result(reply)
        if acks:
            try:
                execute(self._conn, _sql.ACK_BATCH, _sql.ack_batch_params(self.queue, acks))
            except Exception:
                pass

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        try:
            execute(self._conn, _sql.DROP_QUEUE, (self.queue,))
        except Exception:
            pass  # it goes with its heartbeats
        self._conn.close()
