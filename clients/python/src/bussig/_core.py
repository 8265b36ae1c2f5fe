"""What the thread and asyncio workers share: which handler a message goes to, and the book of the
messages a worker holds (fetched, running, finished), with no I/O of its own."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from . import _sql, outcome
from .outcome import Outcome
from .routing import Decoder, Handler, Route, Router

STOP_TIMEOUT = 10.0
"""How long a stop lets running handlers finish, by default; a loop ended by an error gives them as long."""
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 5.0
FLUSH_ATTEMPTS = 3
"""How often a stopping worker tries at least to hand in what it holds, reconnecting in between; it
goes on trying, with the reconnect backoff, until the stop's deadline."""


@dataclass
class Stats:
    """What a worker has done so far; read it while it runs."""

    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    in_flight: int = 0
    reconnects: int = 0


@dataclass
class Options:
    concurrency: int = 1
    batch: int = 10
    lock_timeout: float = 30.0
    """How long a read locks a message; a message held past half of it has its lock extended."""
    wait: float = 5.0
    """How long an idle worker's read waits for work: also the longest a stop waits for that read."""
    heartbeat: Optional[float] = None
    """How often an ephemeral queue is heartbeated (a third of its ttl): the loop wakes at least as
    often. None for a queue that is not ephemeral."""


@dataclass
class Job:
    """A fetched message and the route that will handle it."""

    fields: dict[str, Any]
    route: Route
    payload: Any

    @property
    def key(self) -> _sql.Ack:
        return (self.fields["message_id"], self.fields["lock_token"])


class Dispatch:
    """Chooses each message's handler: the router's first matching route, else the worker's handler."""

    def __init__(
        self, router: Optional[Router], handler: Optional[Handler], transactional: bool, decode: Optional[Decoder]
    ) -> None:
        if router is None and handler is None:
            raise ValueError("a worker needs a router, a handler, or both")
        self.router = router
        self.fallback = Route(">", handler, transactional, decode) if handler is not None else None

    @property
    def routes(self) -> list[Route]:
        routes = self.router.routes if self.router is not None else []
        return routes + ([self.fallback] if self.fallback is not None else [])

    @property
    def patterns(self) -> list[str]:
        return self.router.patterns if self.router is not None else []

    def plan(self, fields: dict[str, Any]) -> Union[Job, outcome.Bury]:
        subject = fields["subject"]
        route = self.router.route(subject) if self.router is not None else None
        route = route or self.fallback
        if route is None:
            return outcome.Bury(outcome.UNROUTABLE, f"no handler for subject {subject!r}")
        payload = fields["payload"]
        if route.decode is not None:
            try:
                payload = route.decode(payload)
            except Exception as error:
                return outcome.Bury(outcome.UNDECODABLE, f"{type(error).__name__}: {error}")
        return Job(fields, route, payload)


@dataclass
class Book:
    """The messages a worker holds. Neither thread- nor task-safe: the thread worker guards it with
    its lock; the asyncio worker touches it from one event loop."""

    options: Options
    stats: Stats = field(default_factory=Stats)
    fetched: deque[Job] = field(default_factory=deque)
    """Read but not started: started as handler slots free up, given back at a stop."""
    running: dict[_sql.Ack, Job] = field(default_factory=dict)
    locked_since: dict[_sql.Ack, float] = field(default_factory=dict)
    """When each held message's lock was last taken or extended."""
    acks: list[_sql.Ack] = field(default_factory=list)
    """Finished messages, acked with the next read."""
    to_settle: list[tuple[_sql.Ack, Outcome]] = field(default_factory=list)
    """Outcomes other than an ack, applied by the loop on its connection (again after a reconnect)."""
    in_transaction: set[_sql.Ack] = field(default_factory=set)
    """Running messages a transactional handler is settling (replying to) in its own transaction,
    which holds their rows: neither extended nor given back by the loop, whose statements would wait
    for that transaction."""

    def fetch(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            self.fetched.append(job)
            self.locked_since[job.key] = now

    def free_slots(self) -> int:
        return self.options.concurrency - len(self.running)

    def should_read(self) -> bool:
        return not self.fetched and self.free_slots() > 0

    def read_wait(self) -> Optional[float]:
        """Long-poll only when idle: a busy worker must come back to start what it reads and hand in acks."""
        if self.running:
            return None
        return min(self.options.wait, self.options.heartbeat or self.options.wait)

    def start_next(self) -> Optional[Job]:
        if not self.fetched or self.free_slots() <= 0:
            return None
        job = self.fetched.popleft()
        self.running[job.key] = job
        self.stats.in_flight = len(self.running)
        return job

    def finish(self, job: Job, result: Outcome) -> None:
        """Records a handler's outcome; one whose message was given back meanwhile is dropped."""
        self.in_transaction.discard(job.key)
        if self.running.pop(job.key, None) is None:
            return
        if not isinstance(result, outcome.Ack):
            # An ack waits for the next read, maybe long (every fetched message starts first): its
            # lock is kept extended until ``take_acks`` hands it out.
            self.locked_since.pop(job.key, None)
        self.stats.in_flight = len(self.running)
        if isinstance(result, (outcome.Ack, outcome.Reply, outcome.Settled)):
            self.stats.handled += 1
        else:
            self.stats.failed += 1
        if isinstance(result, outcome.Bury):
            self.stats.dead_lettered += 1
        if isinstance(result, outcome.Ack):
            self.acks.append(job.key)
        elif not isinstance(result, outcome.Settled):
            self.to_settle.append((job.key, result))

    def bury(self, key: _sql.Ack, result: outcome.Bury) -> None:
        self.stats.dead_lettered += 1
        self.locked_since.pop(key, None)
        self.to_settle.append((key, result))

    def take_acks(self) -> list[_sql.Ack]:
        acks, self.acks = self.acks, []
        for key in acks:
            self.locked_since.pop(key, None)
        return acks

    def take_settlements(self) -> list[tuple[_sql.Ack, Outcome]]:
        settlements, self.to_settle = self.to_settle, []
        return settlements

    def locks_due(self) -> list[_sql.Ack]:
        """Held messages whose lock is half gone; marked extended now (see ``extensions_failed``)."""
        now = time.monotonic()
        due = [key for key, since in self.locked_since.items() if now - since >= self.options.lock_timeout / 2]
        for key in due:
            self.locked_since[key] = now
        return due

    def settling_in_transaction(self, key: _sql.Ack) -> None:
        """A transactional handler settles (replies to) its message in its own transaction, which
        holds the message's row until it ends: an extension or a give-back would wait for it, and
        with it the loop. The row lock keeps every other reader off meanwhile."""
        self.locked_since.pop(key, None)
        self.in_transaction.add(key)

    def not_settling(self, key: _sql.Ack) -> None:
        """The reply in the handler's transaction failed: its lock is kept again."""
        self.in_transaction.discard(key)
        if key in self.running:
            self.locked_since[key] = time.monotonic()

    def extensions_failed(self, keys: list[_sql.Ack]) -> None:
        """The extensions of ``keys`` did not happen (the connection went): due again at once, on the
        next connection, not half a lock later, when the lock may have run out."""
        for key in keys:
            if key in self.locked_since:
                self.locked_since[key] = float("-inf")

    def give_back(self, keys: list[_sql.Ack]) -> None:
        """Queues ``keys`` to be given back at once (nack without delay)."""
        self.to_settle.extend((key, outcome.GIVE_BACK) for key in keys)

    def give_back_fetched(self) -> list[_sql.Ack]:
        keys = [job.key for job in self.fetched]
        self.fetched.clear()
        for key in keys:
            self.locked_since.pop(key, None)
        return keys

    def give_back_running(self, with_transactions: bool) -> list[_sql.Ack]:
        """Handlers cut off by a stop: their messages are given back, their outcomes dropped. Those
        settled in a handler's own transaction only ``with_transactions`` (the asyncio worker
        cancels its handlers, rolling their transactions back, before it gives back): a thread's
        handler goes on, and its transaction's end decides."""
        keys = [key for key in self.running if with_transactions or key not in self.in_transaction]
        self.running.clear()
        self.in_transaction.clear()
        self.stats.in_flight = 0
        for key in keys:
            self.locked_since.pop(key, None)
        return keys

    def held(self) -> int:
        """Messages whose outcome or ack has not reached the database yet."""
        return len(self.to_settle) + len(self.acks)

    def tick(self) -> float:
        """How long the loop may sleep waiting for a handler: it must wake for lock extensions."""
        return min(self.options.wait, self.options.lock_timeout / 4, self.options.heartbeat or self.options.wait)


def settle_statement(queue: str, key: _sql.Ack, result: Outcome) -> Optional[tuple[str, tuple[Any, ...]]]:
    """The statement that applies a non-ack outcome."""
    message_id, token = key
    if isinstance(result, outcome.Nack):
        return _sql.NACK, (queue, message_id, token, result.delay, result.error)
    if isinstance(result, outcome.Bury):
        return _sql.DEAD_LETTER, (queue, message_id, token, result.reason, result.error)
    if isinstance(result, outcome.Reply):
        return _sql.REPLY, _sql.reply_params(queue, message_id, token, result.value, result.headers)
    return None


def cancel_requested() -> bool:
    """Whether the running asyncio task was asked to cancel (a stop, asyncio.run's clean-up), as
    opposed to a CancelledError from a future it awaited. Python 3.11 tells; before, only a stop does."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is not None and cancelling() > 0


def next_pause(pause: float) -> float:
    return min(pause * 2, RECONNECT_MAX)


def started(thread: threading.Thread, ready: threading.Event, error: Callable[[], Optional[BaseException]]) -> None:
    """Starts a consumer's loop thread and returns once it is ready (connected, and subscribed or read
    once); raises what kept it from that."""
    thread.start()
    while not ready.wait(0.05) and thread.is_alive():
        pass
    failed = error()
    if failed is not None:
        thread.join()
        raise failed
