"""Tests run against the database in BUSSIG_TEST_URL (with bussig installed), directly or through a
transaction-pooling pgbouncer. Every test uses queues of its own, so tests may share a database."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

import bussig

URL = os.environ.get("BUSSIG_TEST_URL")
if not URL:
    raise RuntimeError("set BUSSIG_TEST_URL to a conninfo of a database with bussig installed")


@pytest.fixture
def url() -> str:
    assert URL
    return URL


@pytest.fixture
def db(url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection for the test's own statements."""
    with psycopg.connect(url, autocommit=True, prepare_threshold=None, application_name="bussig tests") as conn:
        yield conn


@pytest.fixture
def new_queue(db: psycopg.Connection[Any]) -> Iterator[Callable[..., str]]:
    """Creates a queue with a unique name (settings as create_queue's named arguments); drops it after."""
    created: list[str] = []

    def create(**settings: Any) -> str:
        name = f"py_{uuid.uuid4().hex[:16]}"
        arguments = "".join(f", {key} => %s" for key in settings)
        db.execute(f"SELECT bussig.create_queue(%s{arguments})", (name, *settings.values()))
        created.append(name)
        return name

    yield create
    for name in created:
        db.execute("SELECT bussig.drop_queue(queue) FROM bussig.queues WHERE queue = %s", (name,))


@pytest.fixture
def bus(url: str) -> Iterator[bussig.Bus]:
    with bussig.Bus(url) as bus:
        yield bus


def eventually(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Polls ``check`` until it returns something true, or fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last: {value!r})")
        time.sleep(0.05)


def peek(db: psycopg.Connection[Any], queue: str) -> list[dict[str, Any]]:
    cursor = db.execute("SELECT * FROM bussig.peek(%s, 1000)", (queue,))
    names = [column.name for column in cursor.description or []]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def depth(db: psycopg.Connection[Any], queue: str) -> int:
    row = db.execute("SELECT bussig.queue_depth(%s)", (queue,)).fetchone()
    assert row is not None
    return int(row[0])


def behind_a_proxy(db: psycopg.Connection[Any]) -> bool:
    """Whether the tests reach the server through a proxy such as pgbouncer (another port)."""
    row = db.execute("SELECT inet_server_port()").fetchone()
    return row is not None and row[0] != db.info.port


def kill_backends(db: psycopg.Connection[Any], application_name: str) -> int:
    """Terminates the backends that serve ``application_name`` now; how many."""
    row = db.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = %s AND pid <> pg_backend_pid()",
        (application_name,),
    ).fetchone()
    return int(row[0]) if row else 0
