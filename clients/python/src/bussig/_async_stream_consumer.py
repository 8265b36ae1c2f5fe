"""``StreamConsumer.run``: the stream consumer's loop on asyncio, each partition of a batch a task. It
follows the thread loop in ``stream_consumer.py`` step for step, with the consumer's own state."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from typing import TYPE_CHECKING, Optional

import psycopg

from . import _sql, trace
from ._connections import Row, connect_async, execute_async, reconnect_async
from ._core import FLUSH_ATTEMPTS, RECONNECT_FIRST, cancel_requested, next_pause
from .errors import BussigError, connection_lost, transient
from .stream import (
    CANCEL_EVERY,
    CANCELED_COMMIT_ATTEMPTS,
    Progress,
    extend_due,
    extended,
    extension_failed,
    failed,
    next_extension,
    stopped_early,
)

if TYPE_CHECKING:
    from .stream_consumer import StreamConsumer


class AsyncStreamRun:
    def __init__(self, consumer: StreamConsumer) -> None:
        self.consumer = consumer
        self.stopping = False
        self.conn: Optional[psycopg.AsyncConnection[Row]] = None
        self.waiting_read = False
        self.handlers: set[asyncio.Task[None]] = set()

    async def run(self, grace: float) -> None:
        # The loop runs in a task of its own that a cancellation does not interrupt: a read cut off
        # could have leased partitions nobody would know of. It stops after its batch.
        loop = asyncio.create_task(self.loop())
        try:
            await asyncio.shield(loop)
        except asyncio.CancelledError:
            self.stopping = True
            deadline = time.monotonic() + grace
            # Later cancels (a second one, asyncio.run's clean-up) do not cut the stop short.
            while not loop.done() and time.monotonic() < deadline:
                with contextlib.suppress(asyncio.CancelledError):
                    if self.waiting_read and self.conn is not None:
                        await self.conn.cancel_safe()  # as in the thread consumer's stop
                    await asyncio.wait({loop}, timeout=min(CANCEL_EVERY, max(0.0, deadline - time.monotonic())))
            for handler in list(self.handlers):
                handler.cancel()  # still running after the grace: the records they were on are read again
            while not loop.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({loop})
            raise

    async def loop(self) -> None:
        consumer = self.consumer
        try:
            self.conn = await connect_async(consumer.conninfo, consumer.application_name)
            if consumer.start_at is not None:
                await self.execute(_sql.CREATE_CONSUMER_GROUP, (consumer.stream, consumer.group, consumer.start_at))
            while not self.stopping:
                try:
                    await self.turn()
                except asyncio.CancelledError:
                    # This task itself was cancelled (asyncio.run's clean-up): the commits owed go
                    # out first.
                    self.stopping = True
                    await self.flush()
                    raise
                except Exception as error:
                    if transient(error):
                        continue  # as in the thread consumer
                    if not connection_lost(error, self.conn):
                        raise
                    if not await self.reconnect():
                        break
                    consumer.stats.reconnects += 1
            await self.flush()
        finally:
            if self.conn is not None:
                await self.conn.close()

    async def execute(self, sql: str, params: tuple[object, ...]) -> list[Row]:
        assert self.conn is not None
        return await execute_async(self.conn, sql, params)

    async def turn(self) -> None:
        consumer = self.consumer
        await self.commit()
        if self.stopping:
            return
        lease_ends = time.monotonic() + consumer.lease
        self.waiting_read = True
        try:
            rows = await self.execute(_sql.STREAM_READ, consumer.read_params())
        except psycopg.errors.QueryCanceled:
            if self.stopping:
                return  # the stop cut the wait short
            raise
        finally:
            self.waiting_read = False
        consumer.ready.set()
        batch = consumer.batch(rows, lease_ends)
        await self.extend(batch)  # at once when the read waited long before it found records
        slots = asyncio.Semaphore(consumer.concurrency)
        tasks = [asyncio.create_task(self.handle(progress, slots)) for progress in batch]
        self.handlers.update(tasks)
        try:
            while tasks:
                timeout = next_extension(batch, consumer.lease, time.monotonic())
                if not (await asyncio.wait(tasks, timeout=timeout))[1]:
                    break
                await self.extend(batch)
        finally:
            self.handlers.difference_update(tasks)
        # A task cancelled before it began handled nothing of its partition: its lease is released.
        consumer.batch_done(batch)
        await self.commit()

    async def extend(self, batch: list[Progress]) -> None:
        """As the thread consumer's ``_extend``."""
        consumer = self.consumer
        for progress in extend_due(batch, consumer.lease, time.monotonic()):
            since = time.monotonic()
            try:
                ok = (await self.execute(_sql.STREAM_EXTEND_LEASE, consumer.extend_params(progress)))[0][0]
            except Exception:
                extension_failed(progress)
                continue
            extended(consumer.stats, progress, ok, since, consumer.lease)

    async def handle(self, progress: Progress, slots: asyncio.Semaphore) -> None:
        try:
            async with slots:
                for record in progress.records:
                    if stopped_early(record, self.stopping, progress, time.monotonic()):
                        break
                    span = trace.processing(self.consumer.stream, f"{record.partition}:{record.seq}", None, record.headers)
                    try:
                        with span:
                            value = self.consumer.handler(record)
                            if inspect.isawaitable(value):
                                await value
                    except Exception:
                        failed(progress, record)
                        break
                    except asyncio.CancelledError:
                        if self.stopping or cancel_requested():
                            raise
                        # Cancelled from inside, not by a stop: a failure, tried again once a lease.
                        failed(progress, record)
                        break
                    progress.handled += 1
        except asyncio.CancelledError:
            pass  # cut off after a stop's grace: the record it was on is read again
        finally:
            progress.done = True

    async def commit(self) -> None:
        consumer = self.consumer
        canceled = 0
        while consumer.pending:
            try:
                ok = (await self.execute(*consumer.next_settlement()))[0][0]
            except psycopg.errors.QueryCanceled:
                canceled += 1
                if canceled < CANCELED_COMMIT_ATTEMPTS:
                    continue  # the stop's cancel, meant for a read, came late to this commit
                raise
            consumer.committed(ok)

    async def reconnect(self) -> bool:
        """Connects again, retrying with a capped backoff; False when a stop came first."""
        consumer = self.consumer
        stopping = lambda: self.stopping  # noqa: E731
        self.conn = await reconnect_async(
            self.conn, consumer.conninfo, consumer.application_name, stopping, asyncio.sleep
        )
        return self.conn is not None

    async def flush(self) -> None:
        """As the thread consumer's ``_flush``."""
        pause = RECONNECT_FIRST
        for _ in range(FLUSH_ATTEMPTS):
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = await connect_async(self.consumer.conninfo, self.consumer.application_name, pause * 10)
                await self.commit()
                return
            except Exception as error:
                if not connection_lost(error, self.conn):
                    raise
                if self.conn is not None:
                    await self.conn.close()
                await asyncio.sleep(pause)
                pause = next_pause(pause)
        self.consumer.not_committed()
