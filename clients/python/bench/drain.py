"""Drains a pre-filled queue with a handler that does nothing: bussig's Worker (asyncio and threads)
against procrastinate and pgqueuer, each driven through its own worker, on the same database.

    python drain.py --conninfo "host=... dbname=..." [--messages 20000] [--seconds 30] [--concurrency 1,4,16]

Concurrency is each system's bound on handlers in flight: bussig's and procrastinate's
``concurrency``; for pgqueuer ``max_concurrent_tasks``, which must be at least twice its batch, so its
batch is half the concurrency (and at concurrency 1 it runs two). bussig reads batches of 10.

Prints a JSON line of the versions measured, then one per (system, concurrency): messages handled,
seconds, messages per second. Each measurement starts from a queue holding --messages jobs (and
statistics taken after the fill: ANALYZE) and ends when all are handled or --seconds have passed.
procrastinate and pgqueuer install their schemas into the database when they are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import platform
import time
from typing import Any

import psycopg

import bussig

QUEUE = "bench_drain"
BATCH = 10


async def bussig_async(conninfo: str, messages: int, concurrency: int, seconds: float) -> int:
    async with bussig.AsyncBus(conninfo) as bus:
        await bus.execute("SELECT bussig.create_queue(%s)", (QUEUE,))
        await bus.execute("SELECT bussig.purge_queue(%s)", (QUEUE,))
        for start in range(0, messages, 1000):
            payloads = [psycopg.types.json.Jsonb({"n": n}) for n in range(start, min(start + 1000, messages))]
            await bus.execute("SELECT bussig.send_batch(%s, %s::jsonb[])", (QUEUE, payloads))
        await bus.execute("ANALYZE")

        async def noop(message: bussig.AsyncMessage) -> None:
            pass

        worker = bussig.Worker(bus, QUEUE, handler=noop, concurrency=concurrency, batch=BATCH, wait=1.0)
        began = time.monotonic()
        task = asyncio.create_task(worker.run())
        deadline = began + seconds
        while worker.stats.handled < messages and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - began
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return report("bussig", concurrency, worker.stats.handled, elapsed)


async def bussig_threads(conninfo: str, messages: int, concurrency: int, seconds: float) -> int:
    with bussig.Bus(conninfo) as bus:
        bus.execute("SELECT bussig.create_queue(%s)", (QUEUE,))
        bus.execute("SELECT bussig.purge_queue(%s)", (QUEUE,))
        for start in range(0, messages, 1000):
            payloads = [psycopg.types.json.Jsonb({"n": n}) for n in range(start, min(start + 1000, messages))]
            bus.execute("SELECT bussig.send_batch(%s, %s::jsonb[])", (QUEUE, payloads))
        bus.execute("ANALYZE")
        worker = bussig.Worker(bus, QUEUE, handler=lambda message: None, concurrency=concurrency, batch=BATCH, wait=1.0)
        began = time.monotonic()
        worker.start()
        deadline = began + seconds
        while worker.stats.handled < messages and time.monotonic() < deadline:
            time.sleep(0.005)
        elapsed = time.monotonic() - began
        worker.stop()
        return report("bussig-threads", concurrency, worker.stats.handled, elapsed)


async def procrastinate_drain(conninfo: str, messages: int, concurrency: int, seconds: float) -> int:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo))

    @app.task(name="noop", queue=QUEUE)
    async def noop(n: int) -> None:
        pass

    async with app.open_async():
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            exists = await (await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")).fetchone()
            if not (exists and exists[0]):
                await app.schema_manager.apply_schema_async()
            await conn.execute("DELETE FROM procrastinate_jobs WHERE queue_name = %s", (QUEUE,))
            for start in range(0, messages, 1000):
                jobs: list[dict[str, Any]] = [{"n": n} for n in range(start, min(start + 1000, messages))]
                await noop.batch_defer_async(*jobs)
            await conn.execute("ANALYZE")
            began = time.monotonic()
            try:
                # wait=False: the worker returns once the queue is empty.
                await asyncio.wait_for(
                    app.run_worker_async(queues=[QUEUE], concurrency=concurrency, wait=False, install_signal_handlers=False),
                    seconds,
                )
            except asyncio.TimeoutError:
                pass
            elapsed = time.monotonic() - began
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = %s AND status = 'succeeded'", (QUEUE,)
                )
            ).fetchone()
            await conn.execute("DELETE FROM procrastinate_jobs WHERE queue_name = %s", (QUEUE,))
    return report("procrastinate", concurrency, int(row[0]) if row else 0, elapsed)


async def pgqueuer_drain(conninfo: str, messages: int, concurrency: int, seconds: float) -> int:
    from pgqueuer import PgQueuer, PsycopgDriver, Queries
    from pgqueuer.types import QueueExecutionMode

    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        driver = PsycopgDriver(conn)
        queries = Queries(driver)
        if not await queries.has_table("pgqueuer"):
            await queries.install()
        await queries.clear_queue("noop")
        for start in range(0, messages, 1000):
            count = min(start + 1000, messages) - start
            await queries.enqueue(["noop"] * count, [None] * count, [0] * count)
        await conn.execute("ANALYZE")
        handled, last = 0, 0.0
        pgq = PgQueuer(driver)

        @pgq.entrypoint("noop")
        async def noop(job: Any) -> None:
            nonlocal handled, last
            handled += 1
            last = time.monotonic()

        # Handlers in flight are bounded by max_concurrent_tasks, which must be at least twice the
        # batch: the batch is half the concurrency (and concurrency 1 runs up to 2).
        batch = max(1, min(BATCH, concurrency // 2))
        began = time.monotonic()
        # Drain mode returns some time after the queue is empty: the clock stops at the last job.
        running = asyncio.create_task(
            pgq.run(batch_size=batch, max_concurrent_tasks=max(concurrency, 2 * batch), mode=QueueExecutionMode.drain)
        )
        await asyncio.wait([running], timeout=seconds)
        pgq.shutdown.set()  # its own graceful stop, when the time ran out first
        await running
        elapsed = (last if handled >= messages else time.monotonic()) - began
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await Queries(PsycopgDriver(conn)).clear_queue("noop")
    return report("pgqueuer", concurrency, handled, elapsed)


def report(system: str, concurrency: int, handled: int, elapsed: float) -> int:
    line = {
        "system": system,
        "concurrency": concurrency,
        "messages": handled,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(handled / elapsed, 1) if elapsed > 0 else 0.0,
    }
    print(json.dumps(line), flush=True)
    return handled


SYSTEMS = {
    "bussig": bussig_async,
    "bussig-threads": bussig_threads,
    "procrastinate": procrastinate_drain,
    "pgqueuer": pgqueuer_drain,
}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conninfo", required=True)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # It warns that the app is defined in __main__, which matters only for tasks deferred by name elsewhere.
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
    packages = ("bussig", "procrastinate", "pgqueuer", "psycopg")
    versions = {name: importlib.metadata.version(name) for name in packages}
    print(json.dumps({"versions": {"python": platform.python_version(), **versions}}), flush=True)
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        for system in args.systems.split(","):
            await SYSTEMS[system](args.conninfo, args.messages, concurrency, args.seconds)


if __name__ == "__main__":
    asyncio.run(main())
