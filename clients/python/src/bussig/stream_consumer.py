"""``StreamConsumer``: a member of a stream's consumer group. ``start()``/``stop()`` run it on threads;
``await consumer.run()`` runs it on asyncio (see ``_async_stream_consumer``).

The loop owns one connection. It long-polls ``stream_read``, hands each partition's records of the
batch to the handler in seq order (one partition strictly one record after another; up to
``concurrency`` partitions at once), and after the batch commits each partition's last handled seq
with the partition's lease token, which also ends the lease. While a partition is being handled the
loop extends its lease about every third of the lease, so a slow handler keeps it. A handler exception
stops its partition there: what succeeded is committed and the rest is read again (at once when
something was committed, since the commit ends the lease; else once the lease runs out). A partition whose extension was refused
or whose lease ran out (the database out of reach) is not handled further: another member may have it.
A commit the server refuses (a stale lease) is logged and counted, not raised: those records are read
again. A stop lets each partition finish the record it is on, commits what was handled, and releases
the partitions of which nothing was, so that another member reads them at once."""

from __future__ import annotations

import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from typing import Any, Callable, Optional

import psycopg

from . import _sql, trace
from ._connections import Row, connect, execute
from ._core import FLUSH_ATTEMPTS, RECONNECT_FIRST, next_pause, started
from .bus import STREAM_LEASE
from .errors import BussigError, connection_lost, transient
from .stream import (
    CANCEL_EVERY,
    CANCELED_COMMIT_ATTEMPTS,
    Progress,
    Settlement,
    StreamRecord,
    StreamStats,
    by_partition,
    extend_due,
    extended,
    extension_failed,
    failed,
    log,
    next_extension,
    records,
    settled,
    stopped_early,
)


class StreamConsumer:
    """A member of ``group`` of ``stream``: records go to ``handler(record)`` (a function for
    ``start``, a function or coroutine function for ``run``), each partition's in seq order."""

    def __init__(
        self,
        bus: Any,
        stream: str,
        group: str,
        handler: Callable[[StreamRecord], Any],
        *,
        concurrency: int = 1,
        max_records: int = 100,
        wait: _sql.Seconds = 5.0,
        lease: _sql.Seconds = STREAM_LEASE,
        start_at: Optional[str] = None,
    ) -> None:
        """``bus`` is a ``Bus`` or ``AsyncBus`` (its conninfo is used). ``concurrency``: partitions
        handled at once; ``max_records``: most records one read takes (1 to 1000); ``wait``: how long
        an idle read waits for an append; ``lease``: how long a read holds its partitions, so the
        longest a batch may take (seconds or timedeltas). ``start_at`` (``'earliest'`` or
        ``'latest'``): create the group at start if it is missing; without it the group must exist."""
        self.conninfo: str = bus.conninfo
        self.stream = stream
        self.group = group
        self.handler = handler
        self.concurrency = max(1, concurrency)
        self.max_records = min(max(1, max_records), 1000)
        self.wait = _sql.seconds(wait) or 0.0
        self.lease = _sql.seconds(lease) or 0.0
        if self.lease <= 0:
            raise ValueError(f"lease must be positive, not {lease!r}")
        self.start_at = start_at
        self.stats = StreamStats()
        self.ready = threading.Event()
        """Set once the consumer has connected and read once (so the stream and group exist)."""
        self.pending: list[Settlement] = []
        """Commits and releases not yet made: kept across a reconnect."""
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._waiting_read = False
        self._conn: Optional[psycopg.Connection[Row]] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    @property
    def application_name(self) -> str:
        return f"bussig stream {self.stream}/{self.group}"

    def read_params(self) -> tuple[Any, ...]:
        # The first read answers at once, so that start() reports a missing stream or group.
        wait = self.wait if self.ready.is_set() else None
        return (self.stream, self.group, self.max_records, wait, self.lease)

    def batch(self, rows: list[Row], lease_ends: float) -> list[Progress]:
        """A read's records, one ``Progress`` per partition; ``lease_ends`` counts from before the read."""
        return [Progress(partition, lease_ends) for partition in by_partition(records(self.stream, self.group, rows))]

    def extend_params(self, progress: Progress) -> tuple[Any, ...]:
        return (self.stream, self.group, progress.records[0].partition, progress.lease_token, self.lease)

    def batch_done(self, progress: list[Progress]) -> None:
        for partition in progress:
            self.stats.handled += partition.handled
            self.stats.failed += partition.failed
            if partition.settlement is not None:
                self.pending.append(partition.settlement)

    def next_settlement(self) -> tuple[str, tuple[Any, ...]]:
        """The statement of the first pending commit or release."""
        partition, seq, token = self.pending[0]
        if seq is None:
            return _sql.STREAM_RELEASE, (self.stream, self.group, partition, token)
        return _sql.STREAM_COMMIT, (self.stream, self.group, partition, seq, token)

    def committed(self, ok: bool) -> None:
        settled(self.stats, self.stream, self.group, self.pending.pop(0), ok)

    def not_committed(self) -> None:
        if self.pending:
            log.warning(
                "the database could not be reached to commit %d partition(s) of %s/%s: their records are"
                " read again once the lease runs out",
                len(self.pending),
                self.stream,
                self.group,
            )

    # --- threads ---

    def start(self) -> None:
        """Starts consuming on threads. Returns once the consumer has connected and read once; raises
        what kept it from that (``UnknownQueue`` for a missing stream or group, ``InvalidArgument``...)."""
        if inspect.iscoroutinefunction(self.handler):
            raise TypeError(f"{self.handler!r} is a coroutine function: run this consumer with `await consumer.run()`")
        if self._thread is not None:
            raise RuntimeError("the consumer was started already")
        self._thread = threading.Thread(target=self._main, name=f"bussig-stream-{self.stream}", daemon=True)
        started(self._thread, self.ready, lambda: self._error)

    def stop(self, timeout: float = 10.0) -> None:
        """Stops reading, lets each partition finish the record it is on, and commits what was handled.
        Raises ``TimeoutError`` when a handler still runs after ``timeout`` seconds (the consumer then
        commits when it returns), and re-raises an error that stopped the loop."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"a handler of {self.stream}/{self.group} still runs after {timeout:g} s")
            with self._lock:
                if self._waiting_read and self._conn is not None:
                    # An idle read would wait its full time: cut it short (it rolls back, leasing
                    # nothing). Again while it lasts: a cancel that came before the read is lost.
                    self._conn.cancel_safe()
            self._thread.join(min(CANCEL_EVERY, max(0.0, deadline - time.monotonic())))
        if self._error is not None:
            raise self._error

    def __enter__(self) -> StreamConsumer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _main(self) -> None:
        executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"bussig-stream-{self.stream}")
        try:
            self._conn = connect(self.conninfo, self.application_name)
            if self.start_at is not None:
                self._execute(_sql.CREATE_CONSUMER_GROUP, (self.stream, self.group, self.start_at))
            while not self._stopping.is_set():
                try:
                    self._turn(executor)
                except Exception as error:
                    if transient(error):
                        continue  # cancelled by a statement_timeout, or a deadlock: rolled back
                    if not connection_lost(error, self._conn):
                        raise
                    if not self._reconnect():
                        break
                    self.stats.reconnects += 1
            self._flush()
        except BaseException as error:
            self._error = error
        finally:
            executor.shutdown(wait=False)
            if self._conn is not None:
                self._conn.close()

    def _execute(self, sql: str, params: tuple[Any, ...]) -> list[Row]:
        assert self._conn is not None
        return execute(self._conn, sql, params)

    def _turn(self, executor: ThreadPoolExecutor) -> None:
        self._commit()
        with self._lock:
            if self._stopping.is_set():
                return
            self._waiting_read = True
        lease_ends = time.monotonic() + self.lease
        try:
            rows = self._execute(_sql.STREAM_READ, self.read_params())
        except psycopg.errors.QueryCanceled:
            if self._stopping.is_set():
                return  # the stop cut the wait short
            raise
        finally:
            with self._lock:
                self._waiting_read = False
        self.ready.set()
        batch = self.batch(rows, lease_ends)
        self._extend(batch)  # at once when the read waited long before it found records
        futures = [executor.submit(self._handle, progress) for progress in batch]
        while wait_for_futures(futures, next_extension(batch, self.lease, time.monotonic())).not_done:
            self._extend(batch)
        for future in futures:
            future.result()  # what escaped a handler thread stops the loop, as before
        self.batch_done(batch)
        self._commit()

    def _extend(self, batch: list[Progress]) -> None:
        """Extends the leases of the partitions still being handled that are due. One that fails (the
        database out of reach) leaves the lease to run out: handling stops there."""
        for progress in extend_due(batch, self.lease, time.monotonic()):
            since = time.monotonic()
            try:
                ok = self._execute(_sql.STREAM_EXTEND_LEASE, self.extend_params(progress))[0][0]
            except Exception:
                extension_failed(progress)
                continue
            extended(self.stats, progress, ok, since, self.lease)

    def _handle(self, progress: Progress) -> None:
        """Runs on a handler thread: one partition's records of the batch, in order."""
        try:
            for record in progress.records:
                if stopped_early(record, self._stopping.is_set(), progress, time.monotonic()):
                    break
                try:
                    with trace.processing(self.stream, f"{record.partition}:{record.seq}", None, record.headers):
                        self.handler(record)
                except Exception:
                    failed(progress, record)
                    break
                progress.handled += 1
        finally:
            progress.done = True

    def _commit(self) -> None:
        canceled = 0
        while self.pending:
            try:
                ok = self._execute(*self.next_settlement())[0][0]
            except psycopg.errors.QueryCanceled:
                canceled += 1
                if canceled < CANCELED_COMMIT_ATTEMPTS:
                    continue  # the stop's cancel, meant for a read, came late to this commit
                raise
            self.committed(ok)

    def _reconnect(self) -> bool:
        """Connects again, retrying with a capped backoff; False when a stop came first."""
        pause = RECONNECT_FIRST
        while not self._stopping.is_set():
            if self._conn is not None:
                self._conn.close()
            try:
                self._conn = connect(self.conninfo, self.application_name)
                return True
            except BussigError:
                raise
            except psycopg.Error:
                self._stopping.wait(pause)
                pause = next_pause(pause)
        return False

    def _flush(self) -> None:
        """After a stop: the last commits, on a new connection if the old one was lost."""
        pause = RECONNECT_FIRST
        for _ in range(FLUSH_ATTEMPTS):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self.conninfo, self.application_name, pause * 10)
                self._commit()
                return
            except Exception as error:
                if not connection_lost(error, self._conn):
                    raise
                if self._conn is not None:
                    self._conn.close()
                time.sleep(pause)
                pause = next_pause(pause)
        self.not_committed()

    # --- asyncio ---

    async def run(self, *, grace: float = 10.0) -> None:
        """Consumes on the running event loop until cancelled; then stops as ``stop`` does, letting the
        handlers running finish within ``grace`` seconds (those cut off then are read again). Handlers
        may be coroutine functions (awaited) or plain functions (called on the loop: keep them quick)."""
        from ._async_stream_consumer import AsyncStreamRun

        await AsyncStreamRun(self).run(grace)
