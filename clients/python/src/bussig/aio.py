"""``AsyncBus``: ``Bus`` for asyncio, over psycopg's async connections."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Optional

import psycopg
from psycopg_pool import AsyncConnectionPool

from . import _sql, errors
from ._connections import Row, caller_connection_async, connect_async, execute_async
from ._core import RECONNECT_FIRST, next_pause
from ._sql import Seconds
from .bus import (
    EPHEMERAL_TTL,
    REPLY_WAIT,
    STREAM_LEASE,
    BlockedGroup,
    blocked_groups,
    ephemeral_queue,
    reply_queue_subscription,
)
from .message import AsyncMessage, fields
from .stream import StreamRecord, records


class AsyncBus:
    """A database with bussig, for asyncio. ``await bus.close()`` (or ``async with``) when done."""

    def __init__(self, conninfo: str, *, max_connections: int = 10) -> None:
        self.conninfo = conninfo
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Row]] = AsyncConnectionPool(
            conninfo,
            min_size=0,
            max_size=max(1, max_connections),
            kwargs={"autocommit": True, "prepare_threshold": None},
            open=False,
        )
        self._opened = False
        self._requester: Optional[_AsyncRequester] = None
        self._requester_lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncBus:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        requester, self._requester = self._requester, None
        if requester is not None:
            await requester.stop()
        if self._opened:
            await self._pool.close()

    async def execute(self, sql: str, params: tuple[Any, ...] = (), conn: Any = None) -> list[Row]:
        """Runs one statement, on ``conn`` or a pooled connection."""
        if conn is not None:
            return await execute_async(await caller_connection_async(conn), sql, params)
        if not self._opened:
            self._opened = True
            await self._pool.open()
        async with self._pool.connection() as pooled:
            return await execute_async(pooled, sql, params)

    async def send(
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
        """As ``Bus.send``."""
        params = _sql.message_params(
            queue, payload, headers, delay, priority, dedup_id, correlation_id, reply_to, group_id
        )
        value: Optional[int] = (await self.execute(_sql.SEND, params, conn))[0][0]
        return value

    async def publish(
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
        """As ``Bus.publish``."""
        params = _sql.message_params(
            subject, payload, headers, delay, priority, dedup_id, correlation_id, reply_to, group_id
        )
        value: int = (await self.execute(_sql.PUBLISH, params, conn))[0][0]
        return value

    async def queue_depth(self, queue: str, conn: Any = None) -> int:
        value: int = (await self.execute(_sql.QUEUE_DEPTH, (queue,), conn))[0][0]
        return value

    async def blocked_groups(self, queue: str, conn: Any = None) -> list[BlockedGroup]:
        """As ``Bus.blocked_groups``."""
        return blocked_groups(await self.execute(_sql.BLOCKED_GROUPS, (queue,), conn))

    async def append(
        self,
        stream: str,
        payload: Any,
        *,
        subject: Optional[str] = None,
        headers: Optional[Mapping[str, Any]] = None,
        key: Optional[str] = None,
        conn: Any = None,
    ) -> int:
        """As ``Bus.append``."""
        params = _sql.append_params(stream, payload, subject, headers, key)
        value: int = (await self.execute(_sql.APPEND, params, conn))[0][0]
        return value

    async def append_batch(
        self,
        stream: str,
        payloads: Sequence[Any],
        *,
        subjects: Optional[Sequence[Optional[str]]] = None,
        headers: Optional[Mapping[str, Any]] = None,
        keys: Optional[Sequence[Optional[str]]] = None,
        conn: Any = None,
    ) -> int:
        """As ``Bus.append_batch``."""
        params = _sql.append_batch_params(stream, payloads, subjects, headers, keys)
        value: int = (await self.execute(_sql.APPEND_BATCH, params, conn))[0][0]
        return value

    async def stream_read(
        self,
        stream: str,
        group: str,
        max_records: int = 100,
        wait: Optional[Seconds] = None,
        lease: Seconds = STREAM_LEASE,
        conn: Any = None,
    ) -> list[StreamRecord]:
        """As ``Bus.stream_read``."""
        params = (stream, group, max_records, _sql.seconds(wait), _sql.seconds(lease))
        return records(stream, group, await self.execute(_sql.STREAM_READ, params, conn))

    async def stream_commit(
        self, stream: str, group: str, partition: int, seq: int, lease_token: uuid.UUID, conn: Any = None
    ) -> bool:
        """As ``Bus.stream_commit``."""
        params = (stream, group, partition, seq, lease_token)
        value: bool = (await self.execute(_sql.STREAM_COMMIT, params, conn))[0][0]
        return value

    async def stream_extend_lease(
        self,
        stream: str,
        group: str,
        partition: int,
        lease_token: uuid.UUID,
        lease: Seconds = STREAM_LEASE,
        conn: Any = None,
    ) -> bool:
        """As ``Bus.stream_extend_lease``."""
        params = (stream, group, partition, lease_token, _sql.seconds(lease))
        value: bool = (await self.execute(_sql.STREAM_EXTEND_LEASE, params, conn))[0][0]
        return value

    async def stream_release(
        self, stream: str, group: str, partition: int, lease_token: uuid.UUID, conn: Any = None
    ) -> bool:
        """As ``Bus.stream_release``."""
        params = (stream, group, partition, lease_token)
        value: bool = (await self.execute(_sql.STREAM_RELEASE, params, conn))[0][0]
        return value

    async def stream_seek(self, stream: str, group: str, partition: int, seq: int, conn: Any = None) -> None:
        """As ``Bus.stream_seek``."""
        await self.execute(_sql.STREAM_SEEK, (stream, group, partition, seq), conn)

    async def stream_seek_time(self, stream: str, group: str, at: datetime, conn: Any = None) -> None:
        """As ``Bus.stream_seek_time``."""
        await self.execute(_sql.STREAM_SEEK_TIME, (stream, group, at), conn)

    async def request(self, queue: str, payload: Any, timeout: Seconds = 30.0, **options: Any) -> AsyncMessage:
        """As ``Bus.request``."""

        async def send(more: dict[str, Any]) -> None:
            await self.send(queue, payload, **options, **more)

        return await self._ask(timeout, send)

    async def request_subject(self, subject: str, payload: Any, timeout: Seconds = 30.0, **options: Any) -> AsyncMessage:
        """As ``Bus.request_subject``."""

        async def send(more: dict[str, Any]) -> None:
            await self.publish(subject, payload, **options, **more)

        return await self._ask(timeout, send)

    async def _ask(self, timeout: Seconds, send: Callable[[dict[str, Any]], Awaitable[None]]) -> AsyncMessage:
        async with self._requester_lock:
            if self._requester is None:
                self._requester = await _AsyncRequester.start(self.conninfo)
        requester = self._requester
        correlation_id = str(uuid.uuid4())
        waiter: asyncio.Future[AsyncMessage] = asyncio.get_running_loop().create_future()
        requester.waiting[correlation_id] = waiter
        seconds = _sql.seconds(timeout) or 0.0
        try:
            await send({"reply_to": requester.queue, "correlation_id": correlation_id})
            return await asyncio.wait_for(waiter, seconds)
        except asyncio.TimeoutError:
            raise errors.RequestTimeout(seconds) from None
        finally:
            requester.waiting.pop(correlation_id, None)


class _AsyncRequester:
    """As the sync requester: this process's reply queue, read by a task of its own."""

    def __init__(self, queue: str, conninfo: str, conn: psycopg.AsyncConnection[Row]) -> None:
        self.queue = queue
        self.waiting: dict[str, asyncio.Future[AsyncMessage]] = {}
        self._conninfo = conninfo
        self._conn = conn
        self._stopping = False
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, conninfo: str) -> _AsyncRequester:
        queue = ephemeral_queue("reply")
        conn = await connect_async(conninfo, "bussig requester")
        await execute_async(conn, _sql.SUBSCRIBE, reply_queue_subscription(queue))
        return cls(queue, conninfo, conn)

    async def _read(self) -> None:
        acks: list[_sql.Ack] = []
        beat = 0.0
        pause = RECONNECT_FIRST
        while not self._stopping:
            try:
                if self._conn.closed or self._conn.broken:
                    self._conn = await connect_async(self._conninfo, "bussig requester")
                    beat = 0.0
                if time.monotonic() - beat >= EPHEMERAL_TTL / 3:
                    await execute_async(self._conn, _sql.HEARTBEAT, (self.queue,))
                    beat = time.monotonic()
                params = _sql.ack_and_read_params(self.queue, acks, 100, None, REPLY_WAIT)
                rows = await execute_async(self._conn, _sql.ACK_AND_READ, params)
            except errors.UnknownQueue:
                acks = []
                try:
                    await execute_async(self._conn, _sql.SUBSCRIBE, reply_queue_subscription(self.queue))
                    beat = time.monotonic()
                except Exception:
                    await asyncio.sleep(REPLY_WAIT)
                continue
            except Exception as error:
                # As the sync requester: reconnect with a backoff, or pause after another error.
                if errors.connection_lost(error, self._conn):
                    await asyncio.sleep(pause)
                    pause = next_pause(pause)
                else:
                    await asyncio.sleep(REPLY_WAIT)
                continue
            pause = RECONNECT_FIRST
            replies = [AsyncMessage(**fields(self.queue, row)) for row in rows]
            acks = [(reply.message_id, reply.lock_token) for reply in replies]
            for reply in replies:
                waiter = self.waiting.pop(reply.correlation_id or "", None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(reply)
        if acks:
            try:
                await execute_async(self._conn, _sql.ACK_BATCH, _sql.ack_batch_params(self.queue, acks))
            except Exception:
                pass

    async def stop(self) -> None:
        self._stopping = True
        await self._task
        try:
            await execute_async(self._conn, _sql.DROP_QUEUE, (self.queue,))
        except Exception:
            pass
        await self._conn.close()
