"""``Worker.run``: the worker's loop on asyncio, handlers as tasks. It follows the thread loop in
``worker.py`` step for step; the book and the dispatch are the same objects."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from typing import TYPE_CHECKING, Any, Optional

import psycopg
from psycopg_pool import AsyncConnectionPool

from . import _sql, outcome, trace
from ._connections import Row, connect_async, execute_async, reconnect_async
from ._core import (
    FLUSH_ATTEMPTS,
    RECONNECT_FIRST,
    Book,
    Dispatch,
    Job,
    cancel_requested,
    next_pause,
    settle_statement,
)
from .errors import BussigError, LeftLocked, UnknownQueue, connection_lost, transient
from .message import AsyncMessage, fields

if TYPE_CHECKING:
    from .worker import Worker


class AsyncRun:
    def __init__(self, worker: Worker, dispatch: Dispatch, book: Book) -> None:
        self.worker = worker
        self.queue = worker.queue
        self.options = worker.options
        self.dispatch = dispatch
        self.book = book
        self.changed = asyncio.Event()
        self.stopping = False
        self.conn: Optional[psycopg.AsyncConnection[Row]] = None
        self.transactions: Optional[AsyncConnectionPool[psycopg.AsyncConnection[Row]]] = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_heartbeat = 0.0
        self.waiting_read = False

    async def run(self, grace: float) -> None:
        # The loop runs in a task of its own that a cancellation does not interrupt: a read cut off
        # could have locked messages nobody would know of. It stops after its read returns. A later
        # cancel (a second one, asyncio.run's clean-up) does not cut the stop short either.
        loop = asyncio.create_task(self.loop(grace))
        asked_to_stop = False
        while True:
            try:
                await asyncio.shield(loop)
            except asyncio.CancelledError:
                if loop.done():
                    raise
                if not asked_to_stop:
                    asked_to_stop = True
                    self.stop(grace)
                    with contextlib.suppress(asyncio.CancelledError):
                        await self.cut_idle_read_short()
                continue
            if asked_to_stop:
                raise asyncio.CancelledError
            return

    def stop(self, grace: float) -> None:
        self.stopping = True
        self.deadline = time.monotonic() + grace
        self.changed.set()

    async def cut_idle_read_short(self) -> None:
        if self.waiting_read and self.conn is not None:
            # An idle read would wait its full time: cut it short (it rolls back, locking nothing).
            await self.conn.cancel_safe()

    async def loop(self, grace: float) -> None:
        self.deadline = time.monotonic() + grace
        try:
            self.conn = await connect_async(self.worker.conninfo, f"bussig worker {self.queue}")
            if self.worker.ephemeral and not self.dispatch.patterns:
                raise ValueError("a broadcast worker needs a router with patterns")
            await self.subscribe()
            if any(route.transactional for route in self.dispatch.routes):
                self.transactions = AsyncConnectionPool(
                    self.worker.conninfo,
                    min_size=0,
                    max_size=self.options.concurrency,
                    kwargs={"autocommit": True, "prepare_threshold": None},
                    open=False,
                )
                await self.transactions.open()
            self.worker.ready.set()
            failed: Optional[Exception] = None
            cancelled = False
            while not self.stopping:
                try:
                    await self.turn()
                except asyncio.CancelledError:
                    # This task itself was cancelled (asyncio.run's clean-up cancels every task left):
                    # what it holds is still handed in, within the grace.
                    self.stop(grace)
                    cancelled = True
                    break
                except Exception as error:
                    if transient(error):
                        continue
                    if self.worker.ephemeral and isinstance(error, UnknownQueue):
                        # The worker dropped this process's queue while the database was away.
                        try:
                            await self.subscribe()
                            continue
                        except Exception as remaking:
                            error = remaking
                    if not connection_lost(error, self.conn):
                        # What is held is handed in first, as at a stop, with a stop's grace.
                        failed = error
                        if not self.stopping:
                            self.deadline = time.monotonic() + grace
                        break
                    if self.stopping or not await self.reconnect():
                        break  # the drain hands in what is held, on a new connection
                    self.book.stats.reconnects += 1
            await self.drain()
            if failed is not None:
                raise failed
            if cancelled:
                raise asyncio.CancelledError
        finally:
            await self.close()

    async def subscribe(self) -> None:
        ttl = self.worker.ttl if self.worker.ephemeral else None
        for pattern in self.dispatch.patterns:
            await self.execute(_sql.SUBSCRIBE, (self.queue, pattern, ttl))
        await self.execute(_sql.QUEUE_DEPTH, (self.queue,))  # an unknown queue fails the run at once
        self.last_heartbeat = time.monotonic()

    async def execute(self, sql: str, params: tuple[Any, ...]) -> list[Row]:
        assert self.conn is not None
        return await execute_async(self.conn, sql, params)

    async def reconnect(self) -> bool:
        """Connects again, retrying with a capped backoff; False when a stop came first."""

        async def pause(seconds: float) -> None:
            if self.stopping:
                return  # a stop came: its wake-up is not to be cleared
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), seconds)  # a stop sets it
            except asyncio.TimeoutError:
                pass

        application_name = f"bussig worker {self.queue}"
        stopping = lambda: self.stopping  # noqa: E731
        self.conn = await reconnect_async(self.conn, self.worker.conninfo, application_name, stopping, pause)
        return self.conn is not None

    async def turn(self) -> None:
        self.changed.clear()
        await self.settle()
        await self.keep_locks()
        while (job := self.book.start_next()) is not None:
            task = asyncio.create_task(self.handle(job))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if self.book.should_read():
            acks = self.book.take_acks()
            wait = self.book.read_wait()
            try:
                self.waiting_read = wait is not None
                rows = await self.execute(
                    _sql.ACK_AND_READ,
                    _sql.ack_and_read_params(self.queue, acks, self.options.batch, self.options.lock_timeout, wait),
                )
            except BaseException as error:
                self.book.acks[:0] = acks  # sent again; stale ones are skipped
                if isinstance(error, psycopg.errors.QueryCanceled) and self.stopping:
                    return  # the stop cut the wait short
                raise
            finally:
                self.waiting_read = False
            self.fetched(rows)
            if rows or not self.book.running:
                return
        try:
            await asyncio.wait_for(self.changed.wait(), self.book.tick())
        except asyncio.TimeoutError:
            pass

    def fetched(self, rows: list[Row]) -> None:
        jobs = []
        for row in rows:
            planned = self.dispatch.plan(fields(self.queue, row))
            if isinstance(planned, Job):
                jobs.append(planned)
            else:
                self.book.bury((row[0], row[1]), planned)
        self.book.fetch(jobs)

    async def settle(self) -> None:
        pending = self.book.take_settlements()
        while pending:
            key, result = pending[0]
            statement = settle_statement(self.queue, key, result)
            try:
                if statement is not None:
                    await self.execute(*statement)
            except BussigError as error:
                # As in the thread worker: nacked with the error, not left locked.
                if isinstance(result, (outcome.Reply, outcome.Bury)):
                    try:
                        await self.execute(_sql.NACK, (self.queue, *key, None, f"{type(error).__name__}: {error}"))
                    except BaseException:
                        self.book.to_settle[:0] = pending
                        raise
            except BaseException:
                self.book.to_settle[:0] = pending
                raise
            pending.pop(0)

    async def keep_locks(self) -> None:
        due = self.book.locks_due()
        for done, (message_id, token) in enumerate(due):
            try:
                await self.execute(_sql.EXTEND_LOCK, (self.queue, message_id, token, self.options.lock_timeout))
            except BaseException:
                self.book.extensions_failed(due[done:])
                raise
        beat = self.options.heartbeat
        if beat is not None and time.monotonic() - self.last_heartbeat >= beat:
            await self.execute(_sql.HEARTBEAT, (self.queue,))
            self.last_heartbeat = time.monotonic()

    async def handle(self, job: Job) -> None:
        message = AsyncMessage(**{**job.fields, "payload": job.payload})
        result: outcome.Outcome
        try:
            with trace.processing(self.queue, message.message_id, message.delivery_count, message.headers):
                if job.route.transactional:
                    result = await self.in_transaction(job, message)
                else:

                    async def reply(payload: Any) -> Optional[int]:
                        return await self.reply(self.execute, message, payload)

                    message._replier = reply
                    value = job.route.handler(message)
                    if inspect.isawaitable(value):
                        value = await value
                    result = outcome.of_return(value, message.reply_to, message.replied)
        except Exception as error:
            result = outcome.of_exception(error)
        except asyncio.CancelledError as cancelled:
            if self.stopping or cancel_requested():
                result = outcome.GIVE_BACK  # cut off by a stop: the message was given back already
            else:
                # Cancelled from inside (a future it awaited was cancelled): a failure like any
                # other, nacked with the queue's backoff, not given back at once and again.
                result = outcome.of_exception(RuntimeError(f"the handler was cancelled: {cancelled!r}"))
        except BaseException:
            # KeyboardInterrupt, SystemExit: its message is given back, and its slot freed.
            self.book.finish(job, outcome.GIVE_BACK)
            self.changed.set()
            raise
        self.book.finish(job, result)
        self.changed.set()

    async def reply(self, run: Any, message: AsyncMessage, payload: Any) -> Optional[int]:
        params = _sql.reply_params(self.queue, message.message_id, message.lock_token, payload)
        reply_id: Optional[int] = (await run(_sql.REPLY, params))[0][0]
        return reply_id

    async def in_transaction(self, job: Job, message: AsyncMessage) -> outcome.Outcome:
        assert self.transactions is not None
        async with self.transactions.connection() as conn, conn.transaction():
            message.conn = conn

            async def run(sql: str, params: tuple[Any, ...]) -> list[Row]:
                return await execute_async(conn, sql, params)

            async def reply(payload: Any) -> Optional[int]:
                # As in the thread worker: marked before the reply takes the row.
                self.book.settling_in_transaction(job.key)
                reply_id: Optional[int] = None
                try:
                    reply_id = await self.reply(run, message, payload)
                finally:
                    if reply_id is None:
                        self.book.not_settling(job.key)
                if reply_id is None:
                    raise outcome.LockLost(*job.key)
                return reply_id

            message._replier = reply
            value = job.route.handler(message)
            if inspect.isawaitable(value):
                value = await value
            result = outcome.of_return(value, message.reply_to, message.replied)
            if isinstance(result, outcome.Reply):
                await reply(result.value)
            elif isinstance(result, outcome.Ack) and not (await run(_sql.ACK, (self.queue, *job.key)))[0][0]:
                raise outcome.LockLost(*job.key)
        return outcome.Settled()

    async def drain(self) -> None:
        """As the thread worker's ``_drain``."""
        self.book.give_back(self.book.give_back_fetched())
        await self.flush()
        while self.book.running and time.monotonic() < self.deadline:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(self.deadline - time.monotonic(), self.book.tick()))
            except asyncio.TimeoutError:
                pass
            await self.flush()
        self.book.give_back(self.book.give_back_running(with_transactions=True))
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if not await self.flush():
            raise LeftLocked(self.queue, self.book.held())

    async def flush(self) -> bool:
        """As the thread worker's ``_flush``."""
        pause = RECONNECT_FIRST
        attempt = 0
        while True:
            attempt += 1
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = await connect_async(
                        self.worker.conninfo, f"bussig worker {self.queue}", max(0.0, self.deadline - time.monotonic())
                    )
                await self.settle()
                await self.keep_locks()
                acks = self.book.take_acks()
                try:
                    if acks:
                        await self.execute(_sql.ACK_BATCH, _sql.ack_batch_params(self.queue, acks))
                except BaseException:
                    self.book.acks[:0] = acks
                    raise
                return True
            except BussigError:
                raise
            except Exception as error:
                if isinstance(error, psycopg.errors.QueryCanceled) and attempt < FLUSH_ATTEMPTS:
                    continue  # the stop's cancel came late, to this statement
                if not connection_lost(error, self.conn):
                    raise
                if self.conn is not None:
                    await self.conn.close()
                remaining = self.deadline - time.monotonic()
                if attempt >= FLUSH_ATTEMPTS and remaining <= 0:
                    return False
                await asyncio.sleep(max(0.0, min(pause, remaining)))
                pause = next_pause(pause)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.transactions is not None:
            await self.transactions.close(timeout=1.0)
        if self.conn is not None:
            if self.worker.ephemeral:
                try:
                    await self.execute(_sql.DROP_QUEUE, (self.queue,))
                except Exception:
                    pass
            await self.conn.close()
