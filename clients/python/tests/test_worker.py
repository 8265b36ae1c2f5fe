"""The thread worker: each outcome, transactional handlers, routing, stop, a lost connection."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import psycopg
import pytest

import bussig
from conftest import behind_a_proxy, depth, kill_backends, eventually, peek

WAIT = 0.5  # seconds an idle test worker waits per read


@pytest.fixture
def running() -> Iterator[Callable[[bussig.Worker], bussig.Worker]]:
    """Starts workers and stops them after the test, whatever happened."""
    workers: list[bussig.Worker] = []

    def start(worker: bussig.Worker) -> bussig.Worker:
        worker.start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop(timeout=5)


def dead_letters(db: psycopg.Connection[Any], queue: str) -> list[dict[str, Any]]:
    return peek(db, f"{queue}_dlq")


def test_return_acks(bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any) -> None:
    queue = new_queue()
    seen: list[Any] = []
    for n in range(25):
        bus.send(queue, {"n": n}, headers={"h": "v"}, correlation_id=f"c{n}")
    worker = running(bussig.Worker(bus, queue, handler=lambda m: seen.append((m.payload["n"], m.header("h"))), batch=7, wait=WAIT))
    eventually(lambda: depth(db, queue) == 0, what="all acked")
    assert sorted(seen) == [(n, "v") for n in range(25)]
    assert worker.stats.handled == 25 and worker.stats.failed == 0


def test_message_fields(bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any) -> None:
    queue = new_queue()
    got: list[bussig.Message] = []
    sent = bus.send(queue, {"x": 1}, correlation_id="corr", reply_to=queue)
    running(bussig.Worker(bus, queue, handler=got.append, wait=WAIT))
    message = eventually(lambda: got and got[0])
    assert (message.message_id, message.delivery_count, message.correlation_id, message.reply_to) == (sent, 1, "corr", queue)
    assert message.subject is None and message.payload == {"x": 1} and message.conn is None


def test_retry_nacks_with_its_delay(bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any) -> None:
    queue = new_queue()
    deliveries: list[float] = []

    def handler(message: bussig.Message) -> None:
        deliveries.append(time.monotonic())
        if message.delivery_count == 1:
            raise bussig.Retry(delay=1.0)

    bus.send(queue, {})
    running(bussig.Worker(bus, queue, handler=handler, wait=WAIT))
    eventually(lambda: len(deliveries) == 2 and depth(db, queue) == 0, what="retried once and acked")
    assert deliveries[1] - deliveries[0] >= 0.9


def test_dead_letter_with_reason(bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any) -> None:
    queue = new_queue()

    def handler(message: bussig.Message) -> None:
        raise bussig.DeadLetter("invalid", error="no such customer")

    bus.send(queue, {"customer": 7})
    worker = running(bussig.Worker(bus, queue, handler=handler, wait=WAIT))
    dead = eventually(lambda: dead_letters(db, queue), what="a dead letter")
    assert dead[0]["headers"]["bussig-dead-letter-reason"] == "invalid"
    assert dead[0]["headers"]["bussig-dead-letter-error"] == "no such customer"
    assert worker.stats.dead_lettered == 1


def test_an_exception_nacks_with_its_text(bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any) -> None:
    queue = new_queue(max_deliveries=2, retry_delay="100 milliseconds")
    calls: list[int] = []

    def handler(message: bussig.Message) -> None:
        calls.append(message.delivery_count)
        raise ValueError("boom")

    bus.send(queue, {})
    running(bussig.Worker(bus, queue, handler=handler, wait=WAIT))
    dead = eventually(lambda: dead_letters(db, queue), what="dead after max_deliveries")
    assert calls == [1, 2]
    assert dead[0]["headers"]["bussig-dead-letter-reason"] == "max_deliveries"
    assert dead[0]["headers"]["bussig-dead-letter-error"] == "ValueError: boom"


def test_undecodable_and_unroutable_are_dead_lettered(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any
) -> None:
    queue = new_queue()
    router = bussig.Router(prefix=queue)
    handled: list[int] = []
    router.on("numbers", decode=int)(lambda m: handled.append(m.payload))
    running(bussig.Worker(bus, queue, router=router, wait=WAIT))
    bus.publish(f"{queue}.numbers", 5)
    bus.publish(f"{queue}.numbers", {"not": "a number"})
    bus.send(queue, "no subject")
    dead = eventually(lambda: len(dead_letters(db, queue)) == 2 and dead_letters(db, queue), what="two dead letters")
    reasons = sorted(row["headers"]["bussig-dead-letter-reason"] for row in dead)
    assert reasons == ["undecodable", "unroutable"]
    eventually(lambda: handled == [5])


def test_routing_with_prefixes(bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any) -> None:
    queue = new_queue()
    got: list[tuple[str, Any]] = []
    orders = bussig.Router(prefix="orders")

    @orders.on("*.paid")
    def paid(message: bussig.Message) -> None:
        got.append(("paid", message.subject))

    @orders.on(">")
    def other(message: bussig.Message) -> None:
        got.append(("other", message.subject))

    app = bussig.Router(prefix=queue)
    app.include_router(orders, prefix="shop")
    worker = running(bussig.Worker(bus, queue, router=app, handler=lambda m: got.append(("default", m.subject)), wait=WAIT))
    eventually(lambda: depth(db, queue) == 0 and db.execute(
        "SELECT count(*) FROM bussig.subscriptions WHERE queue = %s", (queue,)).fetchone()[0] == 2, what="subscribed")
    assert worker.patterns == [f"{queue}.shop.orders.*.paid", f"{queue}.shop.orders.>"]
    assert bus.publish(f"{queue}.shop.orders.eu.paid", {}) == 1
    assert bus.publish(f"{queue}.shop.orders.eu.refunded", {}) == 1
    assert bus.publish(f"{queue}.elsewhere", {}) == 0
    bus.send(queue, {})
    eventually(lambda: len(got) == 3)
    assert sorted(got, key=str) == sorted(
        [("paid", f"{queue}.shop.orders.eu.paid"), ("other", f"{queue}.shop.orders.eu.refunded"), ("default", None)], key=str
    )


def test_transactional_handler_commits_with_the_ack_or_rolls_back(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any
) -> None:
    queue = new_queue(retry_delay="100 milliseconds")
    table = f"{queue}_effects"
    db.execute(f"CREATE TABLE {table} (n int, delivery int)")
    try:
        def handler(message: bussig.Message) -> None:
            assert message.conn is not None
            message.conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (message.payload, message.delivery_count))
            if message.payload == 2 and message.delivery_count == 1:
                raise RuntimeError("rolled back")

        bus.send(queue, 1)
        bus.send(queue, 2)
        running(bussig.Worker(bus, queue, handler=handler, transactional=True, concurrency=2, wait=WAIT))
        eventually(lambda: depth(db, queue) == 0, what="both acked")
        rows = sorted(db.execute(f"SELECT n, delivery FROM {table}").fetchall())
        assert rows == [(1, 1), (2, 2)]  # the failed first delivery of 2 left nothing
    finally:
        db.execute(f"DROP TABLE {table}")


def test_a_transactional_reply_does_not_hold_up_the_loop(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any
) -> None:
    """A transactional handler that replies early holds its request's row until its transaction
    ends: the loop must not wait for it to extend that lock, but go on reading and acking."""
    queue, replies = new_queue(), new_queue()
    replied, done = threading.Event(), threading.Event()
    handled: list[str] = []

    def handler(message: bussig.Message) -> None:
        if message.payload == "request":
            message.reply("answer")
            replied.set()
            time.sleep(4)  # past half the lock (1 s) several times over
            done.set()
        else:
            handled.append(message.payload)

    bus.send(queue, "request", reply_to=replies)
    running(
        bussig.Worker(bus, queue, handler=handler, transactional=True, concurrency=2, lock_timeout=1.0, wait=WAIT)
    )
    assert replied.wait(10)
    time.sleep(0.7)  # the request's lock is due for an extension now
    bus.send(queue, "other")
    eventually(lambda: handled == ["other"] and depth(db, queue) == 1, timeout=3, what="the other message acked")
    assert not done.is_set(), "the other message waited for the request's transaction"
    eventually(lambda: depth(db, queue) == 0 and depth(db, replies) == 1, what="the request acked by its reply")


def test_long_handlers_have_their_locks_extended(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any
) -> None:
    queue = new_queue()
    counts: list[int] = []

    def slow(message: bussig.Message) -> None:
        counts.append(message.delivery_count)
        time.sleep(2.5)

    bus.send(queue, {})
    running(bussig.Worker(bus, queue, handler=slow, lock_timeout=1.0, wait=WAIT))
    eventually(lambda: depth(db, queue) == 0, what="acked")
    assert counts == [1]  # the lock never ran out, so nobody got it again


def test_stop_finishes_or_gives_back_everything(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str]
) -> None:
    queue = new_queue()
    release = threading.Event()
    started: list[int] = []

    def handler(message: bussig.Message) -> None:
        started.append(message.payload)
        if message.payload % 2:
            release.wait(30)  # odd ones hang past the stop's deadline

    for n in range(20):
        bus.send(queue, n)
    worker = bussig.Worker(bus, queue, handler=handler, concurrency=4, batch=10, lock_timeout=60, wait=WAIT)
    worker.start()
    eventually(lambda: len(started) >= 4, what="handlers running")
    worker.stop(timeout=1)
    release.set()
    rows = peek(db, queue)
    assert all(row["state"] == "ready" for row in rows), rows
    assert len(rows) == 20 - worker.stats.handled
    # Everything left is delivered again at once to the next worker.
    again: list[int] = []
    with bussig.Worker(bus, queue, handler=lambda m: again.append(m.payload), wait=WAIT):
        eventually(lambda: depth(db, queue) == 0, what="the rest handled")
    assert sorted(set(started) | set(again)) == list(range(20))


def test_a_killed_connection_is_reconnected(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any
) -> None:
    queue = new_queue(lock_timeout="3 seconds")
    handled: set[int] = set()

    def handler(message: bussig.Message) -> None:
        handled.add(message.payload)
        time.sleep(0.01)

    for n in range(200):
        bus.send(queue, n)
    worker = running(bussig.Worker(bus, queue, handler=handler, concurrency=2, lock_timeout=3, wait=WAIT))
    eventually(lambda: len(handled) >= 20, what="some handled")

    eventually(lambda: kill_backends(db, f"bussig worker {queue}"), what="the worker's backend terminated")
    eventually(lambda: depth(db, queue) == 0, timeout=30, what="all handled after the reconnect")
    assert handled == set(range(200))
    # Behind pgbouncer in transaction pooling, a backend killed between transactions goes unnoticed.
    assert worker.stats.reconnects >= 1 or behind_a_proxy(db)


def test_stop_cuts_an_idle_wait_short(bus: bussig.Bus, db: Any, new_queue: Callable[..., str]) -> None:
    queue = new_queue()
    worker = bussig.Worker(bus, queue, handler=lambda m: None, wait=30)
    worker.start()
    time.sleep(0.3)  # let it settle into its long poll
    began = time.monotonic()
    worker.stop()
    assert time.monotonic() - began < 5
    bus.send(queue, {})
    assert [row["state"] for row in peek(db, queue)] == ["ready"]


def test_start_fails_on_an_unknown_queue(bus: bussig.Bus) -> None:
    with pytest.raises(bussig.UnknownQueue):
        bussig.Worker(bus, "py_no_such_queue_anywhere", handler=lambda m: None).start()


async def test_run_fails_on_an_unknown_queue(url: str) -> None:
    async with bussig.AsyncBus(url) as bus:
        with pytest.raises(bussig.UnknownQueue):
            await bussig.Worker(bus, "py_no_such_queue_anywhere", handler=lambda m: None).run()


def test_fetched_messages_waiting_for_a_slot_keep_their_locks(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any
) -> None:
    queue = new_queue()
    counts: list[int] = []

    def slow(message: bussig.Message) -> None:
        counts.append(message.delivery_count)
        time.sleep(0.7)

    for n in range(3):
        bus.send(queue, n)
    # One read takes all three; the last waits 1.4 s for the only slot, past its 1 s lock.
    running(bussig.Worker(bus, queue, handler=slow, concurrency=1, batch=3, lock_timeout=1.0, wait=WAIT))
    eventually(lambda: depth(db, queue) == 0, what="all acked")
    assert counts == [1, 1, 1]


def test_finished_messages_waiting_for_their_ack_keep_their_locks(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str], running: Any
) -> None:
    queue = new_queue()
    started = threading.Event()

    def slow(message: bussig.Message) -> None:
        started.set()
        time.sleep(0.7)

    for n in range(3):
        bus.send(queue, n)
    # One read takes all three; the first finishes at 0.7 s, but its ack goes with the next read,
    # after the third finished at 2.1 s: past its 1 s lock, which only an extension keeps.
    running(bussig.Worker(bus, queue, handler=slow, concurrency=1, batch=3, lock_timeout=1.0, wait=WAIT))
    assert started.wait(10)
    time.sleep(1.6)
    taken = db.execute("SELECT message_id FROM bussig.read(%s, 10)", (queue,)).fetchall()
    assert taken == [], "a finished message's lock ran out before its ack"
    eventually(lambda: depth(db, queue) == 0, what="all acked")


def test_reads_cancelled_by_a_statement_timeout_are_made_again(url: str, db: Any, new_queue: Callable[..., str], running: Any) -> None:
    if behind_a_proxy(db):
        pytest.skip("pgbouncer refuses the options startup parameter; the direct run covers this")
    queue = new_queue()
    got: list[Any] = []
    # Every idle read (a 1 s wait) is cancelled after 0.3 s: 57014, and the worker reads again.
    with bussig.Bus(f"{url} options='-c statement_timeout=300'") as bus:
        worker = running(bussig.Worker(bus, queue, handler=lambda m: got.append(m.payload), wait=1.0))
        time.sleep(1.5)
        bus.send(queue, {"after": "timeouts"})
        eventually(lambda: got, what="the message sent after the cancelled reads")
        worker.stop(timeout=5)
    assert got == [{"after": "timeouts"}]


def test_a_transactional_handler_cut_off_by_stop_commits_nothing(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str]
) -> None:
    queue = new_queue()
    table = f"{queue}_effects"
    db.execute(f"CREATE TABLE {table} (n int)")
    release, finished = threading.Event(), threading.Event()
    try:
        def handler(message: bussig.Message) -> None:
            assert message.conn is not None
            message.conn.execute(f"INSERT INTO {table} VALUES (%s)", (message.payload,))
            release.wait(30)
            finished.set()

        bus.send(queue, 1)
        worker = bussig.Worker(bus, queue, handler=handler, transactional=True, lock_timeout=60, wait=WAIT)
        worker.start()
        eventually(lambda: worker.stats.in_flight == 1, what="the handler running")
        worker.stop(timeout=0.5)
        assert [row["state"] for row in peek(db, queue)] == ["ready"]  # given back
        release.set()
        assert finished.wait(10)
        # The handler's ack fails on the given-back message and its transaction rolls back: the lock
        # waits for that transaction to end, whichever way.
        with db.transaction():
            db.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        assert db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
        assert [row["state"] for row in peek(db, queue)] == ["ready"]
    finally:
        release.set()
        db.execute(f"DROP TABLE {table}")


def test_stop_hands_in_on_a_new_connection_when_its_own_was_lost(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str]
) -> None:
    queue = new_queue()
    release = threading.Event()
    bus.send(queue, 1)
    # While its only handler runs, the loop has nothing to say to the database: it misses the kill.
    worker = bussig.Worker(bus, queue, handler=lambda m: release.wait(30), lock_timeout=60, wait=WAIT)
    worker.start()
    eventually(lambda: worker.stats.in_flight == 1, what="the handler running")
    # Its connection cut under it (directly or behind a pooler alike): the socket is shut down.
    assert worker._conn is not None
    with socket.socket(fileno=os.dup(worker._conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)
    threading.Timer(0.3, release.set).start()
    worker.stop(timeout=10)  # the handler finishes; its ack goes on a new connection
    assert depth(db, queue) == 0
    assert worker.stats.handled == 1


def test_stop_is_not_held_up_by_a_transactional_reply(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str]
) -> None:
    """A transactional handler that replied early holds the request's row in its transaction: a stop
    whose timeout runs out meanwhile returns, leaving that message to the transaction (a give-back
    would wait for it), which commits the reply when the handler ends."""
    queue, replies = new_queue(), new_queue()
    replied = threading.Event()

    def handler(message: bussig.Message) -> None:
        message.reply("answer")
        replied.set()
        time.sleep(4)

    bus.send(queue, "request", reply_to=replies)
    worker = bussig.Worker(bus, queue, handler=handler, transactional=True, wait=WAIT)
    worker.start()
    assert replied.wait(10)
    began = time.monotonic()
    worker.stop(timeout=0.5)
    assert time.monotonic() - began < 3, "the stop waited for the handler's transaction"
    eventually(lambda: depth(db, queue) == 0 and depth(db, replies) == 1, what="the reply committed")
