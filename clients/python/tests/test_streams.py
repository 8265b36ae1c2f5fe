"""Streams: append, read, commit, seek, lease extension and release on the sync and asyncio buses, and
the stream consumer (per-key order across members, a failing handler, a slow handler keeping its
partition, a stop, asyncio)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, Callable

import psycopg
import pytest

import bussig
from conftest import behind_a_proxy, eventually

WAIT = 0.5  # seconds an idle test consumer waits per read


@pytest.fixture
def new_stream(db: psycopg.Connection[Any]) -> Iterator[Callable[..., str]]:
    """Creates a stream with a unique name and a group ``g`` reading from its start; drops it after."""
    created: list[str] = []

    def create(partitions: int = 1) -> str:
        name = f"py_{uuid.uuid4().hex[:16]}"
        db.execute("SELECT bussig.create_stream(%s, partitions => %s)", (name, partitions))
        db.execute("SELECT bussig.create_consumer_group(%s, 'g', start_at => 'earliest')", (name,))
        created.append(name)
        return name

    yield create
    for name in created:
        db.execute("SELECT bussig.drop_stream(%s)", (name,))


def positions(db: psycopg.Connection[Any], stream: str) -> dict[int, int]:
    """The group ``g``'s committed seq in each partition."""
    rows = db.execute(
        "SELECT partition, committed_seq FROM bussig.consumer_groups WHERE stream = %s AND consumer_group = 'g'",
        (stream,),
    ).fetchall()
    return dict(rows)


def commit_all(bus: bussig.Bus, records: list[bussig.StreamRecord]) -> list[bool]:
    last = {record.partition: record for record in records}
    return [bus.stream_commit(r.stream, r.consumer_group, r.partition, r.seq, r.lease_token) for r in last.values()]


def test_append_read_commit(bus: bussig.Bus, db: Any, url: str, new_stream: Callable[..., str]) -> None:
    stream = new_stream(partitions=2)
    assert bus.append(stream, {"id": 1}, subject="orders.created", headers={"tenant": "acme"}, key="c-1") in (0, 1)
    assert bus.append_batch(stream, [{"id": 2}, {"id": 3}], subjects=["orders.paid", None], keys=["c-1", "c-1"]) == 2
    with psycopg.connect(url, prepare_threshold=None) as conn:
        bus.append(stream, {"id": "rolled back"}, key="c-1", conn=conn)
        conn.rollback()

    records = bus.stream_read(stream, "g", max_records=10, lease=30)
    assert [(r.seq, r.payload, r.subject, r.key) for r in records] == [
        (1, {"id": 1}, "orders.created", "c-1"),
        (2, {"id": 2}, "orders.paid", "c-1"),
        (3, {"id": 3}, None, "c-1"),
    ]
    first = records[0]
    assert (first.stream, first.consumer_group, first.header("tenant")) == (stream, "g", "acme")
    assert records[1].headers == {} and isinstance(first.appended_at, datetime)
    assert len({r.lease_token for r in records}) == 1  # one lease per partition
    assert bus.stream_read(stream, "g") == []  # the partition is leased
    assert commit_all(bus, records) == [True]
    assert positions(db, stream)[first.partition] == 3
    assert bus.stream_read(stream, "g", wait=0.1) == []


def test_seek_replays(bus: bussig.Bus, new_stream: Callable[..., str]) -> None:
    stream = new_stream()
    bus.append_batch(stream, [1, 2, 3])
    before_last = datetime.now(timezone.utc)
    bus.append(stream, 4)
    assert commit_all(bus, bus.stream_read(stream, "g")) == [True]
    bus.stream_seek(stream, "g", 0, 2)
    assert [r.payload for r in bus.stream_read(stream, "g")] == [2, 3, 4]  # seek also ended the lease
    bus.stream_seek_time(stream, "g", before_last)
    assert [r.payload for r in bus.stream_read(stream, "g")] == [4]


def test_a_stale_lease_commit_is_false(bus: bussig.Bus, new_stream: Callable[..., str]) -> None:
    stream = new_stream()
    bus.append_batch(stream, ["a", "b"])
    stale = bus.stream_read(stream, "g", lease=0.2)
    time.sleep(0.4)
    fresh = eventually(lambda: bus.stream_read(stream, "g"), what="the records read again after the lease")
    assert [r.seq for r in fresh] == [r.seq for r in stale] == [1, 2]
    assert bus.stream_commit(stream, "g", 0, 2, stale[0].lease_token) is False
    assert bus.stream_commit(stream, "g", 0, 2, fresh[0].lease_token) is True


def test_extend_and_release_a_lease(bus: bussig.Bus, db: Any, new_stream: Callable[..., str]) -> None:
    stream = new_stream()
    bus.append_batch(stream, ["a", "b"])
    token = bus.stream_read(stream, "g", lease=0.5)[0].lease_token
    assert bus.stream_extend_lease(stream, "g", 0, token, lease=30) is True
    time.sleep(0.7)
    assert bus.stream_read(stream, "g") == []  # kept past the first 0.5 s
    assert bus.stream_extend_lease(stream, "g", 0, uuid.uuid4()) is False
    assert bus.stream_release(stream, "g", 0, uuid.uuid4()) is False
    assert bus.stream_release(stream, "g", 0, token) is True
    assert positions(db, stream)[0] == 0  # the position did not move
    again = bus.stream_read(stream, "g")  # at once, not after 30 s
    assert [r.seq for r in again] == [1, 2]
    assert bus.stream_extend_lease(stream, "g", 0, token) is False  # another read took it since
    assert bus.stream_release(stream, "g", 0, token) is False
    assert bus.stream_release(stream, "g", 0, again[0].lease_token) is True


def test_errors_have_their_classes(bus: bussig.Bus, new_stream: Callable[..., str]) -> None:
    stream = new_stream()
    cases: list[tuple[Callable[[], Any], type[bussig.BussigError], str]] = [
        (lambda: bus.append("py_no_such_stream_anywhere", {}), bussig.UnknownQueue, "42704"),
        (lambda: bus.stream_read(stream, "no_such_group"), bussig.UnknownQueue, "42704"),
        (lambda: bus.stream_read("py_no_such_stream_anywhere", "g"), bussig.UnknownQueue, "42704"),
        (lambda: bus.append("not a valid name!", {}), bussig.InvalidArgument, "22023"),
        (lambda: bus.stream_read(stream, "bad group!"), bussig.InvalidArgument, "22023"),
        (lambda: bus.stream_seek(stream, "g", 7, 1), bussig.InvalidArgument, "22023"),  # no partition 7
        (lambda: bus.append_batch(stream, [1, 2], keys=["k"]), bussig.InvalidArgument, "22023"),
        (lambda: bus.stream_extend_lease(stream, "no_such_group", 0, uuid.uuid4()), bussig.UnknownQueue, "42704"),
        (lambda: bus.stream_release("py_no_such_stream_anywhere", "g", 0, uuid.uuid4()), bussig.UnknownQueue, "42704"),
        (lambda: bus.stream_extend_lease(stream, "g", 7, uuid.uuid4()), bussig.InvalidArgument, "22023"),
        (lambda: bus.stream_release(stream, "bad group!", 0, uuid.uuid4()), bussig.InvalidArgument, "22023"),
    ]
    for call, kind, sqlstate in cases:
        with pytest.raises(kind) as raised:
            call()
        assert raised.value.sqlstate == sqlstate
    consumer = bussig.StreamConsumer(bus, stream, "no_such_group", lambda record: None)
    with pytest.raises(bussig.UnknownQueue):
        consumer.start()


def test_two_members_keep_each_keys_order(bus: bussig.Bus, db: Any, new_stream: Callable[..., str]) -> None:
    stream = new_stream(partitions=4)
    keys = [f"customer-{n}" for n in range(8)]
    handled: list[tuple[str, int, int]] = []  # (key, n, member)
    lock = threading.Lock()

    def member(number: int) -> Callable[[bussig.StreamRecord], None]:
        def handle(record: bussig.StreamRecord) -> None:
            with lock:
                handled.append((record.key or "", record.payload["n"], number))

        return handle

    consumers = [
        bussig.StreamConsumer(bus, stream, "g", member(number), max_records=7, wait=WAIT, concurrency=2)
        for number in (1, 2)
    ]
    for consumer in consumers:
        consumer.start()
    try:
        for n in range(0, 30, 3):
            bus.append_batch(stream, [{"n": m} for m in (n, n + 1, n + 2) for _ in keys], keys=keys * 3)
        eventually(lambda: len(handled) >= 240, what="every record handled")
        time.sleep(2 * WAIT)  # nothing more comes
    finally:
        for consumer in consumers:
            consumer.stop()
    assert len(handled) == 240  # each once
    for key in keys:
        assert [n for k, n, _ in handled if k == key] == list(range(30))
    assert sum(consumer.stats.handled for consumer in consumers) == 240
    assert sum(positions(db, stream).values()) == 240


def test_a_failing_handler_stops_its_partition_there(bus: bussig.Bus, db: Any, new_stream: Callable[..., str]) -> None:
    stream = new_stream()
    seen: list[int] = []

    def handle(record: bussig.StreamRecord) -> None:
        seen.append(record.seq)
        if record.seq == 3 and seen.count(3) == 1:
            raise ValueError("boom")

    bus.append_batch(stream, [1, 2, 3, 4, 5])
    with bussig.StreamConsumer(bus, stream, "g", handle, wait=WAIT) as consumer:
        eventually(lambda: positions(db, stream)[0] == 5, what="everything committed")
    # 1 and 2 committed after the failure, which ended the lease: 3 came back at once.
    assert seen == [1, 2, 3, 3, 4, 5]
    assert (consumer.stats.handled, consumer.stats.failed, consumer.stats.stale_commits) == (5, 1, 0)


def test_a_consumer_whose_lease_was_taken_stops_and_its_stale_commit_is_counted(
    bus: bussig.Bus, db: Any, new_stream: Callable[..., str]
) -> None:
    stream = new_stream()
    bus.append_batch(stream, [1, 2])
    taken = threading.Event()
    seen: list[int] = []

    def handle(record: bussig.StreamRecord) -> None:
        seen.append(record.seq)
        taken.wait(10)  # the first time, until another member has the partition

    with bussig.StreamConsumer(bus, stream, "g", handle, wait=WAIT, lease=0.6) as consumer:
        eventually(lambda: seen, what="the first record handled")
        bus.stream_seek(stream, "g", 0, 1)  # ends the consumer's lease
        assert [r.seq for r in bus.stream_read(stream, "g", lease=0.5)] == [1, 2]
        time.sleep(0.5)  # the consumer's next extension is refused
        taken.set()
        eventually(lambda: positions(db, stream)[0] == 2, what="everything committed")
    # 2 was not handled once the lease was lost; the commit of 1 was refused, so 1 came again after 0.5 s.
    assert seen == [1, 1, 2]
    assert (consumer.stats.stale_commits, consumer.stats.handled) == (1, 3)


def test_a_slow_handler_keeps_its_partition(bus: bussig.Bus, db: Any, new_stream: Callable[..., str]) -> None:
    stream = new_stream()
    bus.append_batch(stream, [1, 2, 3, 4, 5])
    seen: list[int] = []

    def handle(record: bussig.StreamRecord) -> None:
        time.sleep(0.4)  # 2 s for the batch, twice the lease
        seen.append(record.seq)

    with bussig.StreamConsumer(bus, stream, "g", handle, wait=WAIT, lease=1) as consumer:
        # start() returned after the first read: the consumer has the partition. Another member polls.
        while len(seen) < 5 and consumer.stats.commits == 0:
            assert bus.stream_read(stream, "g", lease=1) == []
            time.sleep(0.1)
        eventually(lambda: positions(db, stream)[0] == 5, what="the batch committed")
    assert seen == [1, 2, 3, 4, 5]
    assert consumer.stats.extensions >= 3 and (consumer.stats.handled, consumer.stats.stale_commits) == (5, 0)


def test_a_record_failing_first_is_retried_once_the_lease_ran_out(
    bus: bussig.Bus, db: Any, new_stream: Callable[..., str]
) -> None:
    stream = new_stream()
    seen: list[tuple[int, float]] = []

    def handle(record: bussig.StreamRecord) -> None:
        seen.append((record.seq, time.monotonic()))
        if len(seen) == 1:
            raise ValueError("boom")

    bus.append_batch(stream, [1, 2])
    with bussig.StreamConsumer(bus, stream, "g", handle, wait=WAIT, lease=1) as consumer:
        eventually(lambda: positions(db, stream)[0] == 2, timeout=10, what="everything committed")
    # Nothing was handled, so nothing was released: no busy retry loop, 1 came back after the lease.
    assert [seq for seq, _ in seen] == [1, 1, 2] and seen[1][1] - seen[0][1] > 0.8
    assert (consumer.stats.releases, consumer.stats.failed, consumer.stats.handled) == (0, 1, 2)


def test_stop_commits_what_was_handled(bus: bussig.Bus, db: Any, new_stream: Callable[..., str]) -> None:
    stream = new_stream()
    bus.append_batch(stream, list(range(1, 11)))
    on_three, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def handle(record: bussig.StreamRecord) -> None:
        seen.append(record.seq)
        if record.seq == 3:
            on_three.set()
            release.wait(10)

    consumer = bussig.StreamConsumer(bus, stream, "g", handle, wait=30, lease=60)
    consumer.start()
    assert on_three.wait(10)
    threading.Timer(0.3, release.set).start()
    consumer.stop()  # lets 3 finish, handles no further record
    assert seen == [1, 2, 3] and positions(db, stream)[0] == 3
    # The commit ended the lease: the rest is readable now, not after 60 s.
    assert [r.seq for r in bus.stream_read(stream, "g")] == list(range(4, 11))

    idle = bussig.StreamConsumer(bus, stream, "g", handle, wait=30)
    idle.start()
    started = time.monotonic()
    idle.stop()
    assert time.monotonic() - started < 5  # the stop cut the 30 s read short


def test_stop_releases_a_partition_nothing_was_handled_of(
    bus: bussig.Bus, db: Any, new_stream: Callable[..., str]
) -> None:
    stream = new_stream(partitions=2)
    bus.append_batch(stream, ["a1", "a2"])  # without keys a batch goes to one partition,
    bus.append_batch(stream, ["b1", "b2"])  # the next batch to the next
    started, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def handle(record: bussig.StreamRecord) -> None:
        seen.append(record.payload)
        started.set()
        release.wait(10)

    consumer = bussig.StreamConsumer(bus, stream, "g", handle, wait=WAIT, lease=60, concurrency=1)
    consumer.start()
    assert started.wait(10)
    threading.Timer(0.3, release.set).start()
    consumer.stop()  # one partition handled its first record; the other one did not start
    assert len(seen) == 1 and (consumer.stats.commits, consumer.stats.releases) == (1, 1)
    # Both are readable at once, not after 60 s: one committed, the other released at its first record.
    again = bus.stream_read(stream, "g")
    assert sorted(r.payload for r in again) == sorted({"a1", "a2", "b1", "b2"} - set(seen))
    assert sorted(positions(db, stream).values()) == [0, 1]


async def test_async_bus_and_consumer(url: str, db: Any, new_stream: Callable[..., str]) -> None:
    stream = new_stream(partitions=2)
    handled: list[tuple[str, int]] = []

    async def handle(record: bussig.StreamRecord) -> None:
        await asyncio.sleep(0)
        handled.append((record.key or "", record.payload))

    async with bussig.AsyncBus(url) as bus:
        assert await bus.append(stream, 0, key="a") in (0, 1)
        assert await bus.append_batch(stream, [1, 2], keys=["a", "b"], headers={"h": "v"}) == 2
        records = await bus.stream_read(stream, "g", wait=0.1, lease=0.5)
        assert sorted((r.key, r.payload) for r in records) == [("a", 0), ("a", 1), ("b", 2)]
        assert {r.payload: r.headers for r in records} == {0: {}, 1: {"h": "v"}, 2: {"h": "v"}}
        # a's first record committed; the rest (a's second, b's) comes back at once (b's lease released)
        first = next(r for r in records if r.payload == 0)
        assert await bus.stream_commit(stream, "g", first.partition, first.seq, first.lease_token) is True
        assert await bus.stream_commit(stream, "g", first.partition, first.seq, uuid.uuid4()) is False
        with pytest.raises(bussig.UnknownQueue):
            await bus.stream_seek(stream, "nope", 0, 1)
        b = next(r for r in records if r.key == "b")
        assert await bus.stream_extend_lease(stream, "g", b.partition, b.lease_token, lease=5) is True
        assert await bus.stream_extend_lease(stream, "g", b.partition, uuid.uuid4()) is False
        assert await bus.stream_release(stream, "g", b.partition, uuid.uuid4()) is False
        assert await bus.stream_release(stream, "g", b.partition, b.lease_token) is True  # b's comes back at once
        with pytest.raises(bussig.UnknownQueue):
            await bus.stream_release(stream, "nope", 0, uuid.uuid4())
        with pytest.raises(bussig.InvalidArgument):
            await bus.stream_extend_lease(stream, "g", 9, uuid.uuid4())

        consumer = bussig.StreamConsumer(bus, stream, "g", handle, wait=WAIT, concurrency=2)
        task = asyncio.create_task(consumer.run(grace=2))
        deadline = time.monotonic() + 15
        while len(handled) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await bus.append_batch(stream, [3, 4], keys=["a", "a"])
        while len(handled) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sorted(handled) == [("a", 1), ("a", 3), ("a", 4), ("b", 2)]
    assert [n for key, n in handled if key == "a"] == [1, 3, 4]
    assert consumer.stats.handled == 4 and sum(positions(db, stream).values()) == 5


async def test_async_cancel_commits_what_was_handled(url: str, db: Any, new_stream: Callable[..., str]) -> None:
    stream = new_stream()
    seen: list[int] = []
    never = asyncio.Event()

    async def handle(record: bussig.StreamRecord) -> None:
        seen.append(record.seq)
        if record.seq == 2:
            await never.wait()  # cut off once the grace has passed

    async with bussig.AsyncBus(url) as bus:
        await bus.append_batch(stream, [1, 2, 3])
        consumer = bussig.StreamConsumer(bus, stream, "g", handle, wait=30, lease=60)
        task = asyncio.create_task(consumer.run(grace=0.3))
        deadline = time.monotonic() + 15
        while len(seen) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == [1, 2] and positions(db, stream)[0] == 1
        assert [r.seq for r in await bus.stream_read(stream, "g")] == [2, 3]  # not after 60 s


async def test_async_slow_handler_keeps_its_partition(url: str, db: Any, new_stream: Callable[..., str]) -> None:
    stream = new_stream()
    seen: list[int] = []

    async def handle(record: bussig.StreamRecord) -> None:
        await asyncio.sleep(0.4)  # 2 s for the batch, twice the lease
        seen.append(record.seq)

    async with bussig.AsyncBus(url) as bus:
        await bus.append_batch(stream, [1, 2, 3, 4, 5])
        consumer = bussig.StreamConsumer(bus, stream, "g", handle, wait=WAIT, lease=1)
        task = asyncio.create_task(consumer.run(grace=2))
        deadline = time.monotonic() + 15
        while not consumer.ready.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        while len(seen) < 5 and time.monotonic() < deadline:
            assert await bus.stream_read(stream, "g", lease=1) == []  # another member gets none of it
            await asyncio.sleep(0.1)
        while positions(db, stream)[0] < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert seen == [1, 2, 3, 4, 5] and positions(db, stream)[0] == 5
    assert consumer.stats.extensions >= 3 and consumer.stats.stale_commits == 0


async def test_async_cancel_releases_what_was_not_handled(url: str, db: Any, new_stream: Callable[..., str]) -> None:
    stream = new_stream(partitions=2)
    seen: list[str] = []
    never = asyncio.Event()

    async def handle(record: bussig.StreamRecord) -> None:
        seen.append(record.payload)
        await never.wait()  # cut off once the grace has passed

    async with bussig.AsyncBus(url) as bus:
        await bus.append_batch(stream, ["a1", "a2"])
        await bus.append_batch(stream, ["b1", "b2"])
        consumer = bussig.StreamConsumer(bus, stream, "g", handle, wait=WAIT, lease=60, concurrency=1)
        task = asyncio.create_task(consumer.run(grace=0.3))
        deadline = time.monotonic() + 15
        while not seen and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The one cut off and the one that never started: both released, so readable at once, not after 60 s.
        assert len(seen) == 1 and consumer.stats.releases == 2
        assert sorted(r.payload for r in await bus.stream_read(stream, "g")) == ["a1", "a2", "b1", "b2"]


def test_a_statement_timeout_does_not_end_a_consumer(url: str, db: Any, new_stream: Callable[..., str]) -> None:
    """Idle reads cancelled by a statement_timeout shorter than their wait (57014) are made again, as
    the queue worker makes them: the consumer goes on and reads what comes."""
    if behind_a_proxy(db):
        pytest.skip("a pooler refuses the options startup parameter")
    stream = new_stream()
    seen: list[int] = []
    with bussig.Bus(f"{url} options='-c statement_timeout=300'") as bus:
        with bussig.StreamConsumer(bus, stream, "g", lambda record: seen.append(record.payload), wait=1) as consumer:
            time.sleep(1.5)  # idle reads cut off by the timeout meanwhile
            bus.append(stream, 7)
            eventually(lambda: seen == [7], what="the record read after the timeouts")
            assert consumer.stats.handled == 1
