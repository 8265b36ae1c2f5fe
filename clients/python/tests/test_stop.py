"""A stop while the database is out of reach: what was held is handed in once it is reachable again,
within the stop's time; otherwise the stop says so, and the messages come back when their locks run
out."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import bussig
from conftest import behind_a_proxy, eventually, kill_backends, peek
from relay import Relay

WAIT = 0.5


@pytest.fixture
def relay(url: str) -> Iterator[Relay]:
    relay = Relay(url)
    yield relay
    relay.cut()


def states(db: Any, queue: str) -> list[str]:
    return sorted(row["state"] for row in peek(db, queue))


def holding_ten(bus: bussig.Bus, queue: str, release: threading.Event, **options: Any) -> bussig.Worker:
    """A worker that has read ten messages and runs the first: nine wait for its only slot."""
    for n in range(10):
        bus.send(queue, n)
    return bussig.Worker(bus, queue, handler=lambda m: release.wait(30), batch=10, wait=WAIT, **options)


def test_a_stop_after_the_connection_was_killed_leaves_nothing_locked(
    url: str, db: Any, new_queue: Callable[..., str], relay: Relay
) -> None:
    queue = new_queue()
    release = threading.Event()
    direct = not behind_a_proxy(db)
    # Directly, the worker's backend is terminated; behind pgbouncer an idle client has no backend of
    # its own to terminate, so its connection is cut at the relay instead.
    with bussig.Bus(url if direct else relay.conninfo) as bus:
        worker = holding_ten(bus, queue, release, lock_timeout=60)
        worker.start()
        eventually(lambda: worker.stats.in_flight == 1, what="the handler running")
        assert states(db, queue) == ["locked"] * 10
        if direct:
            eventually(lambda: kill_backends(db, f"bussig worker {queue}"), what="the worker's backend terminated")
        else:
            relay.drop_connections()
        threading.Timer(0.3, release.set).start()
        worker.stop(timeout=10)  # no error: everything handed in on a new connection
    assert worker.stats.handled == 1
    assert states(db, queue) == ["ready"] * 9


def test_a_stop_with_the_database_unreachable_says_what_stays_locked(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str], relay: Relay
) -> None:
    queue = new_queue()
    release = threading.Event()
    with bussig.Bus(relay.conninfo) as relayed:
        worker = holding_ten(relayed, queue, release, lock_timeout=2)
        worker.start()
        eventually(lambda: worker.stats.in_flight == 1, what="the handler running")
        relay.cut()
        threading.Timer(0.3, release.set).start()  # the handler finishes during the stop: its ack is held
        began = time.monotonic()
        with pytest.raises(bussig.LeftLocked) as raised:
            worker.stop(timeout=1)
        assert time.monotonic() - began < 5  # the retries end with the stop's time
    assert worker.stats.handled == 1
    assert raised.value.held == 10 and raised.value.queue == queue
    # Nobody could give them back: their locks run out (2 s), then they are delivered again.
    counts: list[int] = []
    with bussig.Worker(bus, queue, handler=lambda m: counts.append(m.delivery_count), batch=10, wait=WAIT):
        eventually(lambda: len(counts) == 10, timeout=20, what="all ten delivered again")
    assert counts == [2] * 10


async def test_a_cancelled_run_with_the_database_unreachable_says_what_stays_locked(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str], relay: Relay
) -> None:
    queue = new_queue()
    for n in range(10):
        bus.send(queue, n)
    release = asyncio.Event()
    async with bussig.AsyncBus(relay.conninfo) as relayed:
        worker = bussig.Worker(relayed, queue, handler=lambda m: release.wait(), batch=10, lock_timeout=30, wait=WAIT)
        task = asyncio.create_task(worker.run(grace=1))
        deadline = time.monotonic() + 15
        while worker.stats.in_flight != 1:
            assert time.monotonic() < deadline and not task.done(), "the handler never ran"
            await asyncio.sleep(0.05)
        relay.cut()
        began = time.monotonic()
        task.cancel()  # the running handler is cut off at the grace's end
        with pytest.raises(bussig.LeftLocked) as raised:
            await task
        assert time.monotonic() - began < 5
    assert raised.value.held == 10
    assert states(db, queue) == ["locked"] * 10
