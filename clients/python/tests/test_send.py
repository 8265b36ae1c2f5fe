from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

import psycopg
import pytest

import bussig
from conftest import peek


def test_send_with_every_option(bus: bussig.Bus, db: psycopg.Connection[Any], new_queue: Callable[..., str]) -> None:
    queue = new_queue()
    first = bus.send(queue, {"n": 1}, headers={"tenant": "acme"}, priority=5, correlation_id="c-1", reply_to="r")
    later = bus.send(queue, [1, 2], delay=timedelta(minutes=10), dedup_id="d-1")
    assert isinstance(first, int) and isinstance(later, int)
    assert bus.send(queue, "again", delay=600, dedup_id="d-1") is None  # a duplicate
    rows = {row["message_id"]: row for row in peek(db, queue)}
    assert rows[first]["payload"] == {"n": 1}
    assert rows[first]["headers"] == {"tenant": "acme"}
    assert (rows[first]["priority"], rows[first]["correlation_id"], rows[first]["reply_to"]) == (5, "c-1", "r")
    assert rows[first]["state"] == "ready" and rows[later]["state"] == "delayed"
    assert bus.queue_depth(queue) == 2


def test_send_in_the_callers_transaction(bus: bussig.Bus, url: str, new_queue: Callable[..., str]) -> None:
    queue = new_queue()
    with psycopg.connect(url, prepare_threshold=None) as conn:
        bus.send(queue, {"kept": False}, conn=conn)
        conn.rollback()
        bus.send(queue, {"kept": True}, conn=conn)
        assert bus.queue_depth(queue) == 0  # not committed yet
        conn.commit()
    assert bus.queue_depth(queue) == 1


def test_publish_reaches_subscribed_queues(bus: bussig.Bus, db: psycopg.Connection[Any], new_queue: Callable[..., str]) -> None:
    eu, everything = new_queue(), new_queue()
    db.execute("SELECT bussig.subscribe(%s, %s)", (eu, f"{eu}.eu.*"))
    db.execute("SELECT bussig.subscribe(%s, %s)", (everything, f"{eu}.>"))
    assert bus.publish(f"{eu}.eu.paid", {"order": 1}) == 2
    assert bus.publish(f"{eu}.us.paid", {"order": 2}) == 1
    assert [row["subject"] for row in peek(db, eu)] == [f"{eu}.eu.paid"]


def test_errors_have_their_classes(bus: bussig.Bus, new_queue: Callable[..., str]) -> None:
    with pytest.raises(bussig.UnknownQueue) as unknown:
        bus.send("py_no_such_queue_anywhere", {})
    assert unknown.value.sqlstate == "42704"
    with pytest.raises(bussig.InvalidArgument):
        bus.send("not a valid name!", {})
    with pytest.raises(bussig.InvalidArgument):
        bus.publish("bad..subject", {})


async def test_async_send_and_publish(url: str, new_queue: Callable[..., str]) -> None:
    queue = new_queue()
    async with bussig.AsyncBus(url) as bus:
        assert await bus.send(queue, {"a": 1}, delay=0.0) is not None
        async with await psycopg.AsyncConnection.connect(url, prepare_threshold=None) as conn:
            await bus.send(queue, {"a": 2}, conn=conn)
            await conn.rollback()
        assert await bus.queue_depth(queue) == 1
        assert await bus.publish(f"{queue}.nobody.listens", {}) == 0


def test_sqlalchemy_session(bus: bussig.Bus, url: str, new_queue: Callable[..., str]) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    queue = new_queue()
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(url, prepare_threshold=None))
    with Session(engine) as session:
        session.execute(text("SELECT 1"))
        bus.send(queue, {"rolled": "back"}, conn=session)
        session.rollback()
        bus.send(queue, {"committed": True}, conn=session)
        session.commit()
    engine.dispose()
    assert bus.queue_depth(queue) == 1


def test_sqlalchemy_connection(bus: bussig.Bus, db: Any, url: str, new_queue: Callable[..., str]) -> None:
    """A SQLAlchemy Connection on which nothing ran yet: the send begins its transaction, as
    SQLAlchemy's own first statement would, so that its commit() commits the send."""
    from sqlalchemy import create_engine

    queue = new_queue()
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(url, prepare_threshold=None))
    with engine.connect() as connection:
        bus.send(queue, {"rolled": "back"}, conn=connection)
        connection.rollback()
        bus.send(queue, {"committed": True}, conn=connection)
        connection.commit()
    with engine.connect() as connection, connection.begin():
        bus.send(queue, {"in": "begin()"}, conn=connection)
    engine.dispose()
    assert [m["payload"] for m in peek(db, queue)] == [{"committed": True}, {"in": "begin()"}]


async def test_sqlalchemy_async_session(url: str, new_queue: Callable[..., str]) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    queue = new_queue()
    engine = create_async_engine(
        "postgresql+psycopg://", async_creator=lambda: psycopg.AsyncConnection.connect(url, prepare_threshold=None)
    )
    async with bussig.AsyncBus(url) as bus:
        async with AsyncSession(engine) as session:
            await bus.send(queue, {"rolled": "back"}, conn=session)
            await session.rollback()
            await bus.send(queue, {"committed": True}, conn=session)
            await session.commit()
        assert await bus.queue_depth(queue) == 1
    await engine.dispose()


async def test_sqlalchemy_async_connection(url: str, new_queue: Callable[..., str]) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    queue = new_queue()
    engine = create_async_engine(
        "postgresql+psycopg://", async_creator=lambda: psycopg.AsyncConnection.connect(url, prepare_threshold=None)
    )
    async with bussig.AsyncBus(url) as bus:
        async with engine.connect() as connection:
            await bus.send(queue, {"rolled": "back"}, conn=connection)
            await connection.rollback()
            await bus.send(queue, {"committed": True}, conn=connection)
            await connection.commit()
        assert await bus.queue_depth(queue) == 1
    await engine.dispose()


def test_own_connections_keep_alive_within_a_minute(url: str) -> None:
    """The client's own connections send TCP keepalives after 30 s idle (not the system's two hours),
    unless the conninfo sets them."""
    from psycopg.conninfo import make_conninfo

    from bussig import _connections

    with _connections.connect(url) as conn:
        parameters = conn.info.get_parameters()
        assert parameters["keepalives_idle"] == "30"
        assert parameters["keepalives_interval"] == "10"
        assert parameters["keepalives_count"] == "3"
    with _connections.connect(make_conninfo(url, keepalives_idle=7)) as conn:
        assert conn.info.get_parameters()["keepalives_idle"] == "7"
