"""The asyncio worker: outcomes, transactional handlers, routing, cancellation, a lost connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Callable

import pytest

import bussig
from conftest import behind_a_proxy, depth, kill_backends, peek

WAIT = 0.5  # seconds an idle test worker waits per read


async def until(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last: {value!r})")
        await asyncio.sleep(0.05)


@pytest.fixture
async def abus(url: str) -> AsyncIterator[bussig.AsyncBus]:
    async with bussig.AsyncBus(url) as bus:
        yield bus


@pytest.fixture
async def running() -> AsyncIterator[Callable[[bussig.Worker], Any]]:
    """Runs workers as tasks, subscribed before the test goes on; cancels them after."""
    tasks: list[asyncio.Task[None]] = []

    async def run(worker: bussig.Worker) -> asyncio.Task[None]:
        task = asyncio.create_task(worker.run(grace=2))
        tasks.append(task)
        await until(lambda: worker.ready.is_set() or task.done(), what="the worker ready")
        if task.done():
            task.result()
        return task

    yield run
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_outcomes(abus: bussig.AsyncBus, db: Any, new_queue: Callable[..., str], running: Any) -> None:
    queue = new_queue(max_deliveries=2, retry_delay="100 milliseconds")
    router = bussig.Router(prefix=queue)
    seen: list[tuple[str, int]] = []

    @router.on("ok")
    async def ok(message: bussig.AsyncMessage) -> None:
        seen.append(("ok", message.delivery_count))

    @router.on("retry")
    async def retry(message: bussig.AsyncMessage) -> None:
        seen.append(("retry", message.delivery_count))
        if message.delivery_count == 1:
            raise bussig.Retry(delay=0.2)

    @router.on("dead")
    async def dead(message: bussig.AsyncMessage) -> None:
        raise bussig.DeadLetter("refused")

    @router.on("fail")
    def fail(message: bussig.AsyncMessage) -> None:  # a plain function is called on the loop
        raise KeyError("missing")

    worker = bussig.Worker(abus, queue, router=router, concurrency=4, wait=WAIT)
    await running(worker)
    for name in ("ok", "retry", "dead", "fail"):
        assert await abus.publish(f"{queue}.{name}", {}) == 1
    await until(lambda: depth(db, queue) == 0, what="all settled")
    assert sorted(seen) == [("ok", 1), ("retry", 1), ("retry", 2)]
    reasons = {row["subject"]: row["headers"] for row in peek(db, f"{queue}_dlq")}
    assert reasons[f"{queue}.dead"]["bussig-dead-letter-reason"] == "refused"
    assert reasons[f"{queue}.fail"]["bussig-dead-letter-error"] == "KeyError: 'missing'"
    assert worker.stats.dead_lettered == 1 and worker.stats.handled == 2


async def test_transactional_rolls_back_on_error(
    abus: bussig.AsyncBus, db: Any, new_queue: Callable[..., str], running: Any
) -> None:
    queue = new_queue(retry_delay="100 milliseconds")
    table = f"{queue}_effects"
    db.execute(f"CREATE TABLE {table} (n int, delivery int)")
    try:
        router = bussig.Router()

        @router.on(f"{queue}.write", transactional=True)
        async def write(message: bussig.AsyncMessage) -> None:
            assert message.conn is not None
            await message.conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (message.payload, message.delivery_count))
            if message.delivery_count == 1:
                raise RuntimeError("undo")

        await running(bussig.Worker(abus, queue, router=router, wait=WAIT))
        await abus.publish(f"{queue}.write", 7)
        await until(lambda: depth(db, queue) == 0, what="acked on the second delivery")
        assert db.execute(f"SELECT n, delivery FROM {table}").fetchall() == [(7, 2)]
    finally:
        db.execute(f"DROP TABLE {table}")


async def test_a_transactional_reply_does_not_hold_up_the_loop(
    abus: bussig.AsyncBus, db: Any, new_queue: Callable[..., str], running: Any
) -> None:
    """As the thread worker's test: an early reply in the handler's transaction holds the request's
    row, and the loop goes on reading and acking meanwhile."""
    queue, replies = new_queue(), new_queue()
    replied, done = asyncio.Event(), asyncio.Event()
    handled: list[str] = []

    async def handler(message: bussig.AsyncMessage) -> None:
        if message.payload == "request":
            await message.reply("answer")
            replied.set()
            await asyncio.sleep(4)
            done.set()
        else:
            handled.append(message.payload)

    await abus.send(queue, "request", reply_to=replies)
    await running(
        bussig.Worker(abus, queue, handler=handler, transactional=True, concurrency=2, lock_timeout=1.0, wait=WAIT)
    )
    await asyncio.wait_for(replied.wait(), 10)
    await asyncio.sleep(0.7)
    await abus.send(queue, "other")
    await until(lambda: handled == ["other"] and depth(db, queue) == 1, timeout=3, what="the other message acked")
    assert not done.is_set(), "the other message waited for the request's transaction"
    await until(lambda: depth(db, queue) == 0 and depth(db, replies) == 1, what="the request acked by its reply")


async def test_cancel_finishes_or_gives_back_everything(
    abus: bussig.AsyncBus, db: Any, new_queue: Callable[..., str], running: Any
) -> None:
    queue = new_queue()
    started: list[int] = []

    async def handler(message: bussig.AsyncMessage) -> None:
        started.append(message.payload)
        if message.payload % 2:
            await asyncio.sleep(30)  # cut off by the stop

    for n in range(20):
        await abus.send(queue, n)
    worker = bussig.Worker(abus, queue, handler=handler, concurrency=4, lock_timeout=60, wait=WAIT)
    task = asyncio.create_task(worker.run(grace=0.5))
    await until(lambda: len(started) >= 4, what="handlers running")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rows = peek(db, queue)
    assert all(row["state"] == "ready" for row in rows), rows
    assert len(rows) == 20 - worker.stats.handled
    again: list[int] = []

    async def record(message: bussig.AsyncMessage) -> None:
        again.append(message.payload)

    await running(bussig.Worker(abus, queue, handler=record, wait=WAIT))
    await until(lambda: depth(db, queue) == 0, what="the rest handled")
    assert sorted(set(started) | set(again)) == list(range(20))


async def test_a_killed_connection_is_reconnected(
    abus: bussig.AsyncBus, db: Any, new_queue: Callable[..., str], running: Any
) -> None:
    queue = new_queue(lock_timeout="3 seconds")
    handled: set[int] = set()

    async def handler(message: bussig.AsyncMessage) -> None:
        handled.add(message.payload)
        await asyncio.sleep(0.01)

    for n in range(200):
        await abus.send(queue, n)
    worker = bussig.Worker(abus, queue, handler=handler, concurrency=2, lock_timeout=3, wait=WAIT)
    await running(worker)
    await until(lambda: len(handled) >= 20, what="some handled")

    await until(lambda: kill_backends(db, f"bussig worker {queue}"), what="the worker's backend terminated")
    await until(lambda: depth(db, queue) == 0, timeout=30, what="all handled after the reconnect")
    assert handled == set(range(200))
    # Behind pgbouncer in transaction pooling, a backend killed between transactions goes unnoticed.
    assert worker.stats.reconnects >= 1 or behind_a_proxy(db)


async def test_cancel_cuts_an_idle_wait_short(abus: bussig.AsyncBus, new_queue: Callable[..., str], running: Any) -> None:
    queue = new_queue()

    async def handler(message: bussig.AsyncMessage) -> None:
        pass

    worker = bussig.Worker(abus, queue, handler=handler, wait=30)
    task = await running(worker)
    await asyncio.sleep(0.3)  # let it settle into its long poll
    began = time.monotonic()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert time.monotonic() - began < 5


async def test_a_handler_cancelled_from_inside_is_nacked_with_the_backoff(
    abus: bussig.AsyncBus, db: Any, new_queue: Callable[..., str], running: Any
) -> None:
    """A CancelledError out of a future the handler awaited, not out of a stop: a failure, nacked
    with the queue's backoff; given back at once, it came straight back, again and again."""
    queue = new_queue(retry_delay="1 hour", retry_delay_max="1 hour")
    deliveries: list[int] = []

    async def handler(message: bussig.AsyncMessage) -> None:
        deliveries.append(message.delivery_count)
        cancelled = asyncio.get_running_loop().create_future()
        cancelled.cancel()
        await cancelled

    await abus.send(queue, 1)
    await running(bussig.Worker(abus, queue, handler=handler, wait=WAIT))
    await until(lambda: [m["state"] for m in peek(db, queue)] == ["delayed"], what="nacked with the backoff")
    await asyncio.sleep(0.5)
    assert deliveries == [1]


async def test_a_second_cancel_still_hands_in_what_the_worker_held(
    abus: bussig.AsyncBus, db: Any, new_queue: Callable[..., str]
) -> None:
    """A second cancel of ``run`` (or of the loop task, as asyncio.run's clean-up does) does not cut
    the first one's stop short: fetched messages and the one cut off after the grace are given back."""
    queue = new_queue(lock_timeout="10 minutes")
    for n in range(5):
        await abus.send(queue, n)
    started = asyncio.Event()

    async def handler(message: bussig.AsyncMessage) -> None:
        started.set()
        await asyncio.sleep(60)

    worker = bussig.Worker(abus, queue, handler=handler, concurrency=1, wait=WAIT)
    task = asyncio.create_task(worker.run(grace=0.5))
    await asyncio.wait_for(started.wait(), 15)
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [m["state"] for m in peek(db, queue)] == ["ready"] * 5, "left locked"


def test_asyncio_run_ending_under_a_running_worker_hands_in_what_it_held(
    url: str, db: Any, new_queue: Callable[..., str]
) -> None:
    """A program whose main coroutine returns with a worker still running: asyncio.run cancels every
    task left, the worker's loop task among them, which still gives back what it held."""
    queue = new_queue(lock_timeout="10 minutes")
    for n in range(5):
        db.execute("SELECT bussig.send(%s, %s::jsonb)", (queue, str(n)))

    async def main() -> None:
        started = asyncio.Event()

        async def handler(message: bussig.AsyncMessage) -> None:
            started.set()
            await asyncio.sleep(60)

        async with bussig.AsyncBus(url) as bus:
            worker = bussig.Worker(bus, queue, handler=handler, concurrency=1, wait=WAIT)
            asyncio.get_running_loop().create_task(worker.run(grace=0.5))
            await asyncio.wait_for(started.wait(), 15)

    asyncio.run(main())
    assert [m["state"] for m in peek(db, queue)] == ["ready"] * 5, "left locked"
