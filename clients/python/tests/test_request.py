"""Request/reply, broadcast, and trace context."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import pytest

import bussig
from conftest import behind_a_proxy, depth, eventually, kill_backends
from test_async import until

WAIT = 0.5  # seconds an idle test worker waits per read


def test_request_reply(bus: bussig.Bus, db: Any, new_queue: Callable[..., str]) -> None:
    queue = new_queue()
    router = bussig.Router(prefix=queue)

    @router.on("price")
    def price(message: bussig.Message) -> Any:
        return {"sku": message.payload["sku"], "price": 12.5}  # the reply

    @router.on("explicit")
    def explicit(message: bussig.Message) -> None:
        message.reply({"by": "hand"})

    with bussig.Worker(bus, queue, router=router, handler=lambda m: m.reply({"direct": m.payload}), wait=WAIT):
        reply = bus.request(queue, {"q": 1}, timeout=10)
        assert reply.payload == {"direct": {"q": 1}}
        reply = bus.request_subject(f"{queue}.price", {"sku": "A-1"}, timeout=10)
        assert reply.payload == {"sku": "A-1", "price": 12.5}
        assert bus.request_subject(f"{queue}.explicit", {}, timeout=10).payload == {"by": "hand"}
        eventually(lambda: depth(db, queue) == 0, what="requests acked")


def test_request_times_out(bus: bussig.Bus, new_queue: Callable[..., str]) -> None:
    queue = new_queue()
    began = time.monotonic()
    with pytest.raises(bussig.RequestTimeout):
        bus.request(queue, {}, timeout=0.5)
    assert time.monotonic() - began < 5
    with pytest.raises(TimeoutError):  # RequestTimeout is a TimeoutError too
        bus.request(queue, {}, timeout=0.1)


def test_reply_queue_is_dropped_on_close(url: str, db: Any, new_queue: Callable[..., str]) -> None:
    queue = new_queue()
    bus = bussig.Bus(url)
    with pytest.raises(bussig.RequestTimeout):
        bus.request(queue, {}, timeout=0.1)
    reply_queue = db.execute("SELECT reply_to FROM bussig.peek(%s)", (queue,)).fetchone()[0]
    assert reply_queue.startswith("bussig_reply_")
    bus.close()
    assert db.execute("SELECT count(*) FROM bussig.queues WHERE queue = %s", (reply_queue,)).fetchone()[0] == 0


async def test_async_request_reply(url: str, new_queue: Callable[..., str]) -> None:
    queue = new_queue()

    async def answer(message: bussig.AsyncMessage) -> Any:
        return message.payload * 2

    async with bussig.AsyncBus(url) as bus:
        worker = bussig.Worker(bus, queue, handler=answer, concurrency=4, wait=WAIT)
        task = asyncio.create_task(worker.run())
        try:
            replies = await asyncio.gather(*(bus.request(queue, n, timeout=10) for n in range(10)))
            assert [reply.payload for reply in replies] == [n * 2 for n in range(10)]
            with pytest.raises(bussig.RequestTimeout):
                await bus.request(new_queue(), 1, timeout=0.2)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def test_a_requester_comes_back_after_the_database_was_lost(
    bus: bussig.Bus, db: Any, new_queue: Callable[..., str]
) -> None:
    """The reply reader's connection is killed, then its queue dropped (as the worker drops it when the
    process was away past its ttl): the reader connects again, makes the queue again, and later
    requests get their replies."""
    queue = new_queue()
    with bussig.Worker(bus, queue, handler=lambda m: m.payload + 1, wait=WAIT):
        assert bus.request(queue, 1, timeout=10).payload == 2
        reply_queue = bus._started_requester().queue
        # Behind a pooler the backend serves other clients between transactions: only killed directly.
        if not behind_a_proxy(db):
            eventually(lambda: kill_backends(db, "bussig requester"), what="the reader's backend terminated")
            assert bus.request(queue, 10, timeout=10).payload == 11
        db.execute("SELECT bussig.drop_queue(%s)", (reply_queue,))
        eventually(lambda: depth_or_none(db, reply_queue) is not None, what="the reply queue made again")
        assert bus.request(queue, 20, timeout=10).payload == 21


async def test_an_async_requester_comes_back_after_the_database_was_lost(
    url: str, db: Any, new_queue: Callable[..., str]
) -> None:
    queue = new_queue()

    async def answer(message: bussig.AsyncMessage) -> Any:
        return message.payload + 1

    async with bussig.AsyncBus(url) as bus:
        worker = bussig.Worker(bus, queue, handler=answer, wait=WAIT)
        task = asyncio.create_task(worker.run())
        try:
            assert (await bus.request(queue, 1, timeout=10)).payload == 2
            assert bus._requester is not None
            reply_queue = bus._requester.queue
            if not behind_a_proxy(db):
                await until(lambda: kill_backends(db, "bussig requester") > 0, what="the reader's backend terminated")
                assert (await bus.request(queue, 10, timeout=10)).payload == 11
            db.execute("SELECT bussig.drop_queue(%s)", (reply_queue,))
            await until(lambda: depth_or_none(db, reply_queue) is not None, what="the reply queue made again")
            assert (await bus.request(queue, 20, timeout=10)).payload == 21
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def depth_or_none(db: Any, queue: str) -> Any:
    row = db.execute("SELECT messages FROM bussig.queues WHERE queue = %s", (queue,)).fetchone()
    return None if row is None else row[0]


def test_broadcast_reaches_every_process(bus: bussig.Bus, db: Any, new_queue: Callable[..., str]) -> None:
    subject = f"{new_queue()}.cache.invalidate"
    got: list[tuple[int, Any]] = []
    workers = []
    for index in range(2):
        router = bussig.Router()
        router.on(subject)(lambda m, index=index: got.append((index, m.payload)))
        workers.append(bussig.Worker.broadcast(bus, router=router, wait=WAIT))
    for worker in workers:
        worker.start()
    try:
        assert bus.publish(subject, "key-1") == 2
        eventually(lambda: len(got) == 2, what="both got it")
        assert sorted(got) == [(0, "key-1"), (1, "key-1")]
    finally:
        for worker in workers:
            worker.stop()
    names = [worker.queue for worker in workers]
    assert db.execute("SELECT count(*) FROM bussig.queues WHERE queue = ANY(%s)", (names,)).fetchone()[0] == 0


def test_trace_context_crosses_the_queue(bus: bussig.Bus, new_queue: Callable[..., str]) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    queue = new_queue()
    headers: list[dict[str, Any]] = []
    original = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = provider  # the global one may be set once only
    try:
        with tracer.start_as_current_span("checkout") as sender:
            bus.send(queue, {}, headers={"tenant": "acme"})
        with bussig.Worker(bus, queue, handler=lambda m: headers.append(m.headers), wait=WAIT):
            eventually(lambda: any(span.name == f"{queue} process" for span in exporter.get_finished_spans()))
        # A reply carries the context of the handler's span, in the requester's trace.
        with tracer.start_as_current_span("ask") as asker, bussig.Worker(bus, queue, handler=lambda m: "pong"):
            reply = bus.request(queue, "ping", timeout=10)
        assert reply.payload == "pong"
        assert reply.headers["traceparent"].split("-")[1] == format(asker.get_span_context().trace_id, "032x")
    finally:
        trace._TRACER_PROVIDER = original
    process = next(span for span in exporter.get_finished_spans() if span.name == f"{queue} process")
    assert headers[0]["tenant"] == "acme" and headers[0]["traceparent"].startswith("00-")
    assert process.parent is not None and process.parent.span_id == sender.get_span_context().span_id
    assert process.context.trace_id == sender.get_span_context().trace_id
    assert process.kind == trace.SpanKind.CONSUMER
    assert process.attributes is not None and process.attributes["messaging.system"] == "bussig"


def test_no_span_no_trace_headers(bus: bussig.Bus, db: Any, new_queue: Callable[..., str]) -> None:
    queue = new_queue()
    bus.send(queue, {})
    assert db.execute("SELECT headers FROM bussig.peek(%s)", (queue,)).fetchone()[0] is None
