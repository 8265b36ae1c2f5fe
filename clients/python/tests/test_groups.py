"""Ordered groups: group_id on send and publish, on delivered messages, the worker handing out one
message of a group at a time in send order, blocked_groups, and the argument errors; sync and asyncio."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime
from typing import Any, Callable, Union

import psycopg
import pytest

import bussig
from conftest import depth, eventually, peek

WAIT = 0.5  # seconds an idle test worker waits per read
GROUPS = ("a", "b", "c")
PER_GROUP = 5
# Group a's third message is retried once, group b's second is dead-lettered: each group still goes
# on in order, with the later messages waiting for the settled one.
EXPECTED = {
    "a": [(0, 1), (1, 1), (2, 1), (2, 2), (3, 1), (4, 1)],
    "b": [(n, 1) for n in range(PER_GROUP)],
    "c": [(n, 1) for n in range(PER_GROUP)],
}
AnyMessage = Union[bussig.Message, bussig.AsyncMessage]


class Recorder:
    """What handlers saw: each group's deliveries in order, and any two of a group running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: set[str] = set()
        self.overlaps: list[tuple[str, int]] = []
        self.mislabelled: list[tuple[Any, Any]] = []
        self.log: dict[str, list[tuple[int, int]]] = {group: [] for group in GROUPS}

    def enter(self, message: AnyMessage) -> str:
        group: str = message.payload["group"]
        with self.lock:
            if message.group_id != group:
                self.mislabelled.append((message.group_id, message.payload))
            if group in self.active:
                self.overlaps.append((group, message.payload["n"]))
            self.active.add(group)
            self.log[group].append((message.payload["n"], message.delivery_count))
        return group

    def leave(self, group: str) -> None:
        with self.lock:
            self.active.discard(group)

    def complete(self) -> bool:
        with self.lock:
            return all(len(self.log[group]) == len(EXPECTED[group]) for group in GROUPS)

    def settle(self, message: AnyMessage) -> None:
        """The outcome the scenario gives a message (raised from the handler)."""
        group, n = message.payload["group"], message.payload["n"]
        if (group, n, message.delivery_count) == ("a", 2, 1):
            raise bussig.Retry(delay=0.3)
        if (group, n) == ("b", 1):
            raise bussig.DeadLetter("refused")


def send_groups(send: Callable[..., Any]) -> None:
    """Interleaves the groups' messages, so a read sees every group's head."""
    for n in range(PER_GROUP):
        for group in GROUPS:
            send({"group": group, "n": n}, group_id=group)


def check(recorder: Recorder, db: psycopg.Connection[Any], queue: str) -> None:
    assert recorder.overlaps == []
    assert recorder.mislabelled == []
    assert recorder.log == EXPECTED
    dead = peek(db, f"{queue}_dlq")
    assert [(row["payload"], row["group_id"]) for row in dead] == [({"group": "b", "n": 1}, "b")]


def test_worker_delivers_a_group_one_at_a_time_in_order(
    bus: bussig.Bus, db: psycopg.Connection[Any], new_queue: Callable[..., str]
) -> None:
    queue = new_queue()
    recorder = Recorder()
    # Every group's head must be running at once: the groups flow in parallel, not one after another.
    heads = threading.Barrier(len(GROUPS), timeout=10)

    def handler(message: bussig.Message) -> None:
        group = recorder.enter(message)
        try:
            if message.payload["n"] == 0:
                heads.wait()
            time.sleep(0.01)  # some work, so that an overlap would show
            recorder.settle(message)
        finally:
            recorder.leave(group)

    send_groups(lambda payload, **options: bus.send(queue, payload, **options))
    with bussig.Worker(bus, queue, handler=handler, concurrency=4, batch=10, wait=WAIT):
        eventually(lambda: recorder.complete() and depth(db, queue) == 0, what="every group handled")
    check(recorder, db, queue)


async def until(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last: {value!r})")
        await asyncio.sleep(0.05)
    return value


async def test_async_worker_delivers_a_group_one_at_a_time_in_order(
    url: str, db: psycopg.Connection[Any], new_queue: Callable[..., str]
) -> None:
    queue = new_queue()
    recorder = Recorder()
    heads_running = 0
    all_heads = asyncio.Event()

    async def handler(message: bussig.AsyncMessage) -> None:
        nonlocal heads_running
        group = recorder.enter(message)
        try:
            if message.payload["n"] == 0:
                heads_running += 1
                if heads_running == len(GROUPS):
                    all_heads.set()
                await asyncio.wait_for(all_heads.wait(), 10)
            await asyncio.sleep(0.01)
            recorder.settle(message)
        finally:
            recorder.leave(group)

    async with bussig.AsyncBus(url) as bus:
        for n in range(PER_GROUP):
            for group in GROUPS:
                await bus.send(queue, {"group": group, "n": n}, group_id=group)
        worker = bussig.Worker(bus, queue, handler=handler, concurrency=4, batch=10, wait=WAIT)
        task = asyncio.create_task(worker.run(grace=2))
        try:
            await until(lambda: (recorder.complete() and depth(db, queue) == 0) or task.done(), what="every group handled")
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    check(recorder, db, queue)


def test_send_and_publish_with_group_id(
    bus: bussig.Bus, db: psycopg.Connection[Any], url: str, new_queue: Callable[..., str]
) -> None:
    queue = new_queue()
    db.execute("SELECT bussig.subscribe(%s, %s)", (queue, f"{queue}.>"))
    first = bus.send(queue, {"n": 1}, group_id="order-1")
    assert bus.publish(f"{queue}.paid", {"n": 2}, group_id="order-1") == 1
    with psycopg.connect(url, prepare_threshold=None) as conn:
        bus.send(queue, {"n": 3}, group_id="order-1", conn=conn)  # commits with the caller's transaction
    plain = bus.send(queue, {"n": 4})
    rows = peek(db, queue)
    by_n = {row["payload"]["n"]: row for row in rows}
    assert [by_n[n]["group_id"] for n in (1, 2, 3, 4)] == ["order-1", "order-1", "order-1", None]
    assert by_n[1]["state"] == "ready" and by_n[4]["state"] == "ready"
    assert by_n[2]["state"] == by_n[3]["state"] == "waiting_in_group"
    assert by_n[2]["subject"] == f"{queue}.paid"
    # A read hands out the group's head and the ungrouped message, nothing more of the group.
    read = db.execute("SELECT message_id, group_id FROM bussig.read(%s, 10)", (queue,)).fetchall()
    assert sorted(read, key=lambda row: row[0]) == [(first, "order-1"), (plain, None)]


def test_an_empty_or_long_group_id_is_invalid(bus: bussig.Bus, new_queue: Callable[..., str]) -> None:
    queue = new_queue()
    with pytest.raises(bussig.InvalidArgument) as empty:
        bus.send(queue, {}, group_id="")
    assert empty.value.sqlstate == "22023"
    with pytest.raises(bussig.InvalidArgument):
        bus.send(queue, {}, group_id="g" * 257)
    with pytest.raises(bussig.InvalidArgument) as published:
        bus.publish(f"{queue}.x", {}, group_id="")
    assert published.value.sqlstate == "22023"
    assert bus.send(queue, {}, group_id="g" * 256) is not None  # the longest allowed
    assert bus.queue_depth(queue) == 1


def test_blocked_groups(bus: bussig.Bus, db: psycopg.Connection[Any], new_queue: Callable[..., str]) -> None:
    queue = new_queue()
    locked = bus.send(queue, {}, group_id="locked")
    bus.send(queue, {}, group_id="locked")
    delayed = bus.send(queue, {}, group_id="delayed", delay=600)
    retried = bus.send(queue, {}, group_id="retried")
    bus.send(queue, {})  # ungrouped: never listed
    before = bus.blocked_groups(queue)
    assert [(group.group_id, group.head_message_id, group.state) for group in before] == [("delayed", delayed, "delayed")]
    read = "SELECT message_id, lock_token, group_id FROM bussig.read(%s, 10, interval '5 minutes')"
    rows = db.execute(read, (queue,)).fetchall()
    assert {row[0] for row in rows if row[2]} == {locked, retried}
    token = next(row[1] for row in rows if row[0] == retried)
    db.execute("SELECT bussig.nack(%s, %s, %s, interval '10 minutes')", (queue, retried, token))
    blocked = bus.blocked_groups(queue)
    assert sorted((group.group_id, group.head_message_id, group.state) for group in blocked) == [
        ("delayed", delayed, "delayed"),
        ("locked", locked, "locked"),
        ("retried", retried, "retry"),
    ]
    assert all(isinstance(group.since, datetime) and group.since.tzinfo is not None for group in blocked)
    assert bus.blocked_groups(new_queue()) == []
    with pytest.raises(bussig.UnknownQueue):
        bus.blocked_groups("py_no_such_queue_anywhere")


async def test_async_group_id_errors_and_blocked_groups(
    url: str, db: psycopg.Connection[Any], new_queue: Callable[..., str]
) -> None:
    queue = new_queue()
    async with bussig.AsyncBus(url) as bus:
        with pytest.raises(bussig.InvalidArgument) as empty:
            await bus.send(queue, {}, group_id="")
        assert empty.value.sqlstate == "22023"
        with pytest.raises(bussig.InvalidArgument):
            await bus.publish(f"{queue}.x", {}, group_id="")
        head = await bus.send(queue, {"n": 1}, group_id="g")
        await bus.send(queue, {"n": 2}, group_id="g")
        assert await bus.blocked_groups(queue) == []  # the head is ready, not blocked
        rows = db.execute("SELECT message_id, group_id FROM bussig.read(%s, 10)", (queue,)).fetchall()
        assert rows == [(head, "g")]
        blocked = await bus.blocked_groups(queue)
        assert [(group.group_id, group.head_message_id, group.state) for group in blocked] == [("g", head, "locked")]
