"""``Worker``: consumes one queue, handing each message to its route's handler. ``start()``/``stop()``
run it on threads; ``await worker.run()`` runs it on asyncio (see ``_async_worker``).

The loop owns one connection: it reads with ``ack_and_read`` (finished messages acked with the next
read: one round trip per batch at steady state), long-polls only when idle, applies the handlers'
other outcomes, extends locks held past half their time, and reconnects with a capped backoff when
the database is lost. A stop gives back at once what was read but not started, lets running handlers
finish until the deadline, and gives back the rest: nothing is left locked, unless the database stays
out of reach until the deadline (then ``LeftLocked``: those messages wait for their locks to run out)."""

from __future__ import annotations

import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import psycopg
from psycopg_pool import ConnectionPool

from . import _sql, outcome, trace
from ._connections import Row, connect, execute
from ._core import (
    FLUSH_ATTEMPTS,
    RECONNECT_FIRST,
    STOP_TIMEOUT,
    Book,
    Dispatch,
    Job,
    Options,
    Stats,
    next_pause,
    settle_statement,
    started,
)
from .bus import EPHEMERAL_TTL, ephemeral_queue
from .errors import BussigError, LeftLocked, UnknownQueue, connection_lost, transient
from .message import Message, fields
from .routing import Decoder, Handler, Router


class Worker:
    """A worker for ``queue``: messages go to the first route of ``router`` matching their subject,
    else to ``handler``. With a router, the queue is subscribed to the router's patterns at start
    (``subscribe`` creates a missing queue)."""

    def __init__(
        self,
        bus: Any,
        queue: str,
        router: Optional[Router] = None,
        handler: Optional[Handler] = None,
        concurrency: int = 1,
        batch: int = 10,
        *,
        lock_timeout: float = 30.0,
        wait: float = 5.0,
        transactional: bool = False,
        decode: Optional[Decoder] = None,
        ephemeral: bool = False,
        ttl: _sql.Seconds = EPHEMERAL_TTL,
    ) -> None:
        """``bus`` is a ``Bus`` or ``AsyncBus`` (its conninfo is used). ``concurrency``: handlers in
        flight; ``batch``: most messages one read takes; ``lock_timeout`` (seconds); ``wait``: how long
        an idle read waits. ``transactional`` and ``decode`` apply to ``handler``. ``ephemeral``: the
        queue is this process's (subscribed with a ttl, heartbeated, dropped at the end); ``ttl``
        (seconds or a timedelta): how long it outlives the last heartbeat, which comes every third of it."""
        self.conninfo: str = bus.conninfo
        self.queue = queue
        self.ttl = _sql.seconds(ttl) or 0.0
        if ephemeral and self.ttl <= 0:
            raise ValueError(f"ttl must be positive, not {ttl!r}")
        self.options = Options(
            concurrency=max(1, concurrency),
            batch=min(max(1, batch), 1000),
            lock_timeout=lock_timeout,
            wait=wait,
            heartbeat=self.ttl / 3 if ephemeral else None,
        )
        self.ephemeral = ephemeral
        self._dispatch = Dispatch(router, handler, transactional, decode)
        self._book = Book(self.options)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._dirty = False
        self._stopping = threading.Event()
        self._deadline = 0.0
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._conn: Optional[psycopg.Connection[Row]] = None
        self._transactions: Optional[ConnectionPool[psycopg.Connection[Row]]] = None
        self._last_heartbeat = 0.0
        self._waiting_read = False
        self.ready = threading.Event()
        """Set once the worker has connected and subscribed its queue."""

    @classmethod
    def broadcast(
        cls, bus: Any, router: Optional[Router] = None, handler: Optional[Handler] = None, **options: Any
    ) -> Worker:
        """A worker on a queue of this process's own (``bussig_broadcast_<uuid>``) subscribed to the
        router's patterns: every process gets every message (cache invalidation, config reloads). The
        queue is heartbeated while the worker runs and dropped when it stops, or by the server's
        worker once no heartbeat came for ``ttl`` seconds (a process that died). ``options`` are the
        worker's (``ttl``, ``concurrency``, ``wait``...)."""
        return cls(bus, ephemeral_queue("broadcast"), router, handler, ephemeral=True, **options)

    @property
    def stats(self) -> Stats:
        return self._book.stats

    @property
    def patterns(self) -> list[str]:
        return self._dispatch.patterns

    # --- threads ---

    def start(self) -> None:
        """Starts consuming on threads: the loop and ``concurrency`` handler threads. Returns once the
        worker has connected and subscribed its queue; raises what kept it from doing so."""
        for route in self._dispatch.routes:
            if inspect.iscoroutinefunction(route.handler):
                raise TypeError(f"{route.handler!r} is a coroutine function: run this worker with `await worker.run()`")
        if self._thread is not None:
            raise RuntimeError("the worker was started already")
        self._thread = threading.Thread(target=self._main, name=f"bussig-worker-{self.queue}", daemon=True)
        # Subscribed before start returns, so that what is published next reaches the queue.
        started(self._thread, self.ready, lambda: self._error)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stops reading, gives back what was read but not started, lets running handlers finish
        within ``timeout`` seconds and gives back the rest, reconnecting until then if the connection
        is lost. Raises ``LeftLocked`` when the database could not be reached in that time, and
        re-raises an error that stopped the loop."""
        self._deadline = time.monotonic() + timeout
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
            if self._waiting_read and self._conn is not None:
                # An idle read would wait its full time: cut it short (it rolls back, locking nothing).
                self._conn.cancel_safe()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _main(self) -> None:
        executor = ThreadPoolExecutor(self.options.concurrency, thread_name_prefix=f"bussig-handler-{self.queue}")
        try:
            self._conn = connect(self.conninfo, f"bussig worker {self.queue}")
            self._subscribe()
            if any(route.transactional for route in self._dispatch.routes):
                self._transactions = ConnectionPool(
                    self.conninfo,
                    min_size=0,
                    max_size=self.options.concurrency,
                    kwargs={"autocommit": True, "prepare_threshold": None},
                    open=True,
                )
            self.ready.set()
            failed: Optional[Exception] = None
            while not self._stopping.is_set():
                try:
                    self._turn(executor)
                except Exception as error:
                    if transient(error):
                        continue
                    if self.ephemeral and isinstance(error, UnknownQueue):
                        # The worker dropped this process's queue while the database was away.
                        try:
                            self._subscribe()
                            continue
                        except Exception as remaking:
                            error = remaking
                    if not connection_lost(error, self._conn):
                        # What is held is handed in first, as at a stop: running handlers get a
                        # stop's default time to finish, not a deadline long past.
                        failed = error
                        if not self._stopping.is_set():
                            self._deadline = time.monotonic() + STOP_TIMEOUT
                        break
                    if not self._reconnect():
                        break  # stopping: the drain hands in what is held, on a new connection
                    self._book.stats.reconnects += 1
            self._drain()
            if failed is not None:
                raise failed
        except BaseException as error:
            self._error = error
        finally:
            executor.shutdown(wait=False)
            self._close()

    def _execute(self, sql: str, params: tuple[Any, ...]) -> list[Row]:
        assert self._conn is not None
        return execute(self._conn, sql, params)

    def _reconnect(self) -> bool:
        """Connects again, retrying with a capped backoff; False when a stop came first."""
        pause = RECONNECT_FIRST
        while not self._stopping.is_set():
            if self._conn is not None:
                self._conn.close()
            try:
                self._conn = connect(self.conninfo, f"bussig worker {self.queue}")
                return True
            except BussigError:
                raise
            except psycopg.Error:
                self._stopping.wait(pause)
                pause = next_pause(pause)
        return False

    def _subscribe(self) -> None:
        ttl = self.ttl if self.ephemeral else None
        if self.ephemeral and not self._dispatch.patterns:
            raise ValueError("a broadcast worker needs a router with patterns")
        for pattern in self._dispatch.patterns:
            self._execute(_sql.SUBSCRIBE, (self.queue, pattern, ttl))
        self._execute(_sql.QUEUE_DEPTH, (self.queue,))  # an unknown queue or a missing grant fails the start
        self._last_heartbeat = time.monotonic()

    def _turn(self, executor: ThreadPoolExecutor) -> None:
        """One round of the loop: settle, keep locks, start handlers, then read or wait."""
        self._settle()
        self._keep_locks()
        with self._lock:
            while (job := self._book.start_next()) is not None:
                executor.submit(self._handle, job)
            should_read = self._book.should_read()
            wait = self._book.read_wait()
            acks = self._book.take_acks() if should_read else []
            self._dirty = False
        if should_read:
            try:
                with self._lock:
                    self._waiting_read = wait is not None
                rows = self._execute(
                    _sql.ACK_AND_READ,
                    _sql.ack_and_read_params(self.queue, acks, self.options.batch, self.options.lock_timeout, wait),
                )
            except Exception as error:
                # Acks sent with a lost call may or may not have committed; sent again, stale ones are skipped.
                with self._lock:
                    self._book.acks[:0] = acks
                if isinstance(error, psycopg.errors.QueryCanceled) and self._stopping.is_set():
                    return  # the stop cut the wait short
                raise
            finally:
                with self._lock:
                    self._waiting_read = False
            with self._lock:
                self._fetched(rows)
                if rows or not self._book.running:
                    return
        with self._changed:
            self._changed.wait_for(lambda: self._dirty or self._stopping.is_set(), self._book.tick())

    def _fetched(self, rows: list[Row]) -> None:
        jobs = []
        for row in rows:
            planned = self._dispatch.plan(fields(self.queue, row))
            if isinstance(planned, Job):
                jobs.append(planned)
            else:
                self._book.bury((row[0], row[1]), planned)
        self._book.fetch(jobs)

    def _settle(self) -> None:
        """Applies the outcomes handlers left, on the loop's connection; kept for after a reconnect."""
        with self._lock:
            pending = self._book.take_settlements()
        while pending:
            key, result = pending[0]
            statement = settle_statement(self.queue, key, result)
            try:
                if statement is not None:
                    self._execute(*statement)
            except BussigError as error:
                # No reply_to queue, say, or no dead-letter queue (55000): the message is nacked with
                # the error, not left locked until its lock runs out.
                if isinstance(result, (outcome.Reply, outcome.Bury)):
                    try:
                        self._execute(_sql.NACK, (self.queue, *key, None, f"{type(error).__name__}: {error}"))
                    except Exception:
                        with self._lock:
                            self._book.to_settle[:0] = pending
                        raise
            except Exception:
                with self._lock:
                    self._book.to_settle[:0] = pending
                raise
            pending.pop(0)

    def _keep_locks(self) -> None:
        with self._lock:
            due = self._book.locks_due()
        for done, (message_id, token) in enumerate(due):
            try:
                self._execute(_sql.EXTEND_LOCK, (self.queue, message_id, token, self.options.lock_timeout))
            except Exception:
                with self._lock:
                    self._book.extensions_failed(due[done:])
                raise
        beat = self.options.heartbeat
        if beat is not None and time.monotonic() - self._last_heartbeat >= beat:
            self._execute(_sql.HEARTBEAT, (self.queue,))
            self._last_heartbeat = time.monotonic()

    def _handle(self, job: Job) -> None:
        """Runs on a handler thread: the handler, then its outcome handed to the loop."""
        message = Message(**{**job.fields, "payload": job.payload})
        try:
            with trace.processing(self.queue, message.message_id, message.delivery_count, message.headers):
                if job.route.transactional:
                    result = self._in_transaction(job, message)
                else:
                    message._replier = lambda payload: self._reply(self._execute, message, payload)
                    value = job.route.handler(message)
                    result = outcome.of_return(value, message.reply_to, message.replied)
        except Exception as error:
            result = outcome.of_exception(error)
        except BaseException:
            result = outcome.GIVE_BACK
        with self._changed:
            self._book.finish(job, result)
            self._dirty = True
            self._changed.notify_all()

    def _reply(self, run: Any, message: Message, payload: Any) -> Optional[int]:
        rows = run(_sql.REPLY, _sql.reply_params(self.queue, message.message_id, message.lock_token, payload))
        reply_id: Optional[int] = rows[0][0]
        return reply_id

    def _in_transaction(self, job: Job, message: Message) -> outcome.Outcome:
        """The handler and the ack (or reply) in one transaction on a connection of the handler's own."""
        assert self._transactions is not None
        with self._transactions.connection() as conn, conn.transaction():
            message.conn = conn

            def run(sql: str, params: tuple[Any, ...]) -> list[Row]:
                return execute(conn, sql, params)

            def reply(payload: Any) -> Optional[int]:
                # Marked before the reply takes the row, so that the loop never waits for it.
                with self._lock:
                    self._book.settling_in_transaction(job.key)
                reply_id: Optional[int] = None
                try:
                    reply_id = self._reply(run, message, payload)
                finally:
                    if reply_id is None:
                        with self._lock:
                            self._book.not_settling(job.key)
                if reply_id is None:
                    raise outcome.LockLost(message.message_id, message.lock_token)
                return reply_id

            message._replier = reply
            value = job.route.handler(message)
            result = outcome.of_return(value, message.reply_to, message.replied)
            if isinstance(result, outcome.Reply):
                reply(result.value)
            elif isinstance(result, outcome.Ack) and not run(_sql.ACK, (self.queue, *job.key))[0][0]:
                raise outcome.LockLost(*job.key)
        return outcome.Settled()

    def _drain(self) -> None:
        """After a stop: gives back what was not started, waits for running handlers until the
        deadline, acks what finished and gives back what did not. What cannot be handed in by the
        deadline (the database unreachable) stays locked until its lock runs out: LeftLocked."""
        with self._lock:
            self._book.give_back(self._book.give_back_fetched())
        self._flush()
        while True:
            with self._changed:
                remaining = self._deadline - time.monotonic()
                if not self._book.running or remaining <= 0:
                    break
                self._changed.wait_for(lambda: self._dirty, min(remaining, self._book.tick()))
                self._dirty = False
            self._flush()
        with self._lock:
            self._book.give_back(self._book.give_back_running(with_transactions=False))
        if not self._flush():
            raise LeftLocked(self.queue, self._book.held())

    def _flush(self) -> bool:
        """Hands in every outcome and ack held, and keeps the other locks. A lost connection is
        replaced, with the reconnect backoff, until the stop's deadline (and at least FLUSH_ATTEMPTS
        times); False when the database could not be reached by then, the rest kept in the book."""
        pause = RECONNECT_FIRST
        attempt = 0
        while True:
            attempt += 1
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(
                        self.conninfo, f"bussig worker {self.queue}", max(0.0, self._deadline - time.monotonic())
                    )
                self._settle()
                self._keep_locks()
                with self._lock:
                    acks = self._book.take_acks()
                try:
                    if acks:
                        self._execute(_sql.ACK_BATCH, _sql.ack_batch_params(self.queue, acks))
                except Exception:
                    with self._lock:
                        self._book.acks[:0] = acks
                    raise
                return True
            except BussigError:
                raise
            except Exception as error:
                if isinstance(error, psycopg.errors.QueryCanceled) and attempt < FLUSH_ATTEMPTS:
                    continue  # the stop's cancel came late, to this statement
                if not connection_lost(error, self._conn):
                    raise
                if self._conn is not None:
                    self._conn.close()
                remaining = self._deadline - time.monotonic()
                if attempt >= FLUSH_ATTEMPTS and remaining <= 0:
                    return False
                time.sleep(max(0.0, min(pause, remaining)))
                pause = next_pause(pause)

    def _close(self) -> None:
        if self._transactions is not None:
            self._transactions.close(timeout=1.0)
        if self._conn is not None:
            if self.ephemeral:
                try:
                    self._execute(_sql.DROP_QUEUE, (self.queue,))
                except Exception:
                    pass  # the server's worker drops it once its heartbeats stop
            self._conn.close()

    # --- asyncio ---

    async def run(self, *, grace: float = 10.0) -> None:
        """Consumes on the running event loop until cancelled; then stops as ``stop`` does, letting
        running handlers finish within ``grace`` seconds (raising ``LeftLocked`` instead of the
        cancellation when the database stayed out of reach). Handlers may be coroutine functions
        (awaited) or plain functions (called on the loop: keep them quick)."""
        from ._async_worker import AsyncRun

        await AsyncRun(self, self._dispatch, self._book).run(grace)

