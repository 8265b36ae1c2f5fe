"""Broadcast queues' heartbeats: a live worker keeps its queue past the ttl; the queue of a process that
died is dropped by the server. The tests drive the server's maintenance step (``bussig.run_maintenance``)
themselves rather than wait for its background worker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from typing import Any

import psycopg
import pytest

import bussig
from conftest import eventually

TTL = 1.5
"""Heartbeats come every half second: a worker must miss two in a row to lose its queue."""
WATCH = 3 * TTL
"""How long a heartbeated queue is watched for: past its ttl three times over."""

QUEUE_EXISTS = "SELECT count(*) FROM bussig.queues WHERE queue = %s"


def unique_subject() -> str:
    return f"py_{uuid.uuid4().hex[:16]}.cache.invalidate"


def maintained_and_present(db: psycopg.Connection[Any], queue: str) -> bool:
    """Runs a maintenance step (which drops expired ephemeral queues), then says whether ``queue`` is left."""
    db.execute("SELECT bussig.run_maintenance()")
    row = db.execute(QUEUE_EXISTS, (queue,)).fetchone()
    return bool(row and row[0])


def test_a_heartbeated_queue_outlives_its_ttl(bus: bussig.Bus, db: Any) -> None:
    subject = unique_subject()
    got: list[Any] = []
    router = bussig.Router()
    router.on(subject)(lambda m: got.append(m.payload))
    # The default wait (5 s) is longer than the ttl: an idle read must come back in time to heartbeat.
    worker = bussig.Worker.broadcast(bus, router=router, ttl=TTL)
    assert worker.options.wait > TTL
    worker.start()
    try:
        watched_until = time.monotonic() + WATCH
        while time.monotonic() < watched_until:
            assert maintained_and_present(db, worker.queue), "dropped while its worker heartbeats"
            time.sleep(0.1)
        assert bus.publish(subject, "key-1") == 1
        eventually(lambda: got == ["key-1"], what="the message handled")
    finally:
        worker.stop()
    assert not maintained_and_present(db, worker.queue)  # dropped by the stop


async def test_a_heartbeated_queue_outlives_its_ttl_on_asyncio(url: str) -> None:
    subject = unique_subject()
    got: list[Any] = []
    router = bussig.Router()
    router.on(subject)(lambda m: got.append(m.payload))
    async with bussig.AsyncBus(url) as bus, await psycopg.AsyncConnection.connect(
        url, autocommit=True, prepare_threshold=None
    ) as db:
        worker = bussig.Worker.broadcast(bus, router=router, ttl=TTL)
        task = asyncio.create_task(worker.run(grace=2))
        try:
            while not worker.ready.is_set():
                assert not task.done(), task.result()
                await asyncio.sleep(0.05)
            watched_until = time.monotonic() + WATCH
            while time.monotonic() < watched_until:
                await db.execute("SELECT bussig.run_maintenance()")
                row = await (await db.execute(QUEUE_EXISTS, (worker.queue,))).fetchone()
                assert row and row[0] == 1, "dropped while its worker heartbeats"
                await asyncio.sleep(0.1)
            assert await bus.publish(subject, "key-1") == 1
            deadline = time.monotonic() + 15
            while got != ["key-1"]:
                assert time.monotonic() < deadline, f"not handled: {got!r}"
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        row = await (await db.execute(QUEUE_EXISTS, (worker.queue,))).fetchone()
        assert row and row[0] == 0  # dropped by the stop


def test_a_broadcast_queue_dropped_while_away_is_made_again(bus: bussig.Bus, db: Any) -> None:
    """The worker drops a process's queue once its heartbeats stopped for the ttl (the process was
    away from the database that long): the process's worker makes it again and goes on."""
    subject = unique_subject()
    got: list[Any] = []
    router = bussig.Router()
    router.on(subject)(lambda m: got.append(m.payload))
    worker = bussig.Worker.broadcast(bus, router=router, wait=0.2)
    worker.start()
    try:
        db.execute("SELECT bussig.drop_queue(%s)", (worker.queue,))
        eventually(lambda: bus.publish(subject, "after") == 1, what="the queue subscribed again")
        eventually(lambda: got == ["after"], what="the message handled")
    finally:
        worker.stop()
    assert not maintained_and_present(db, worker.queue)


async def test_an_async_broadcast_queue_dropped_while_away_is_made_again(url: str, db: Any) -> None:
    subject = unique_subject()
    got: list[Any] = []
    router = bussig.Router()
    router.on(subject)(lambda m: got.append(m.payload))
    async with bussig.AsyncBus(url) as bus:
        worker = bussig.Worker.broadcast(bus, router=router, wait=0.2)
        task = asyncio.create_task(worker.run(grace=2))
        try:
            while not worker.ready.is_set():
                assert not task.done(), task.result()
                await asyncio.sleep(0.05)
            db.execute("SELECT bussig.drop_queue(%s)", (worker.queue,))
            deadline = time.monotonic() + 15
            while await bus.publish(subject, "after") != 1:
                assert not task.done(), task.result()
                assert time.monotonic() < deadline, "the queue was not subscribed again"
                await asyncio.sleep(0.1)
            while got != ["after"]:
                assert time.monotonic() < deadline, f"not handled: {got!r}"
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert not maintained_and_present(db, worker.queue)


# A process with a broadcast worker that says its queue's name once it runs, then idles until killed.
CHILD = """
import sys, time
import bussig

bus = bussig.Bus(sys.argv[1])
router = bussig.Router()
router.on(sys.argv[2])(lambda message: None)
worker = bussig.Worker.broadcast(bus, router=router, ttl=float(sys.argv[3]))
worker.start()
print(worker.queue, flush=True)
time.sleep(600)
"""


def test_the_queue_of_a_killed_process_is_dropped(url: str, bus: bussig.Bus, db: Any) -> None:
    subject = unique_subject()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, subject, str(TTL)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        queue = child.stdout.readline().strip()
        assert queue.startswith("bussig_broadcast_"), f"the child did not start (said {queue!r})"
        assert maintained_and_present(db, queue)
        assert bus.publish(subject, "before") == 1
    finally:
        child.kill()  # no stop, no drop: only its heartbeats end
        child.wait(10)
    eventually(lambda: not maintained_and_present(db, queue), timeout=30, what="the queue dropped")
    assert bus.publish(subject, "after") == 0  # its subscription went with it


def test_a_ttl_must_be_positive(bus: bussig.Bus) -> None:
    with pytest.raises(ValueError):
        bussig.Worker.broadcast(bus, handler=lambda m: None, ttl=0)
