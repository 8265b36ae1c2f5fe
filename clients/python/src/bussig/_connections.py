"""Connections: the client's own (autocommit, nothing prepared on the server, so that each statement
is a transaction a pooling proxy may route anywhere), and the caller's (a psycopg connection, or a
SQLAlchemy session or connection on the psycopg dialect), whose transaction a call joins."""

from __future__ import annotations

import math
import os
from typing import Any, Awaitable, Callable, Optional

import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import errors
from ._core import RECONNECT_FIRST, next_pause

Row = tuple[Any, ...]


CONNECT_TIMEOUT = 10
"""Seconds a connection attempt of the client's own may take when the conninfo (or PGCONNECT_TIMEOUT)
sets no limit: against a server that drops packets, libpq would wait for the system's (minutes),
and a reconnecting worker's stop with it."""


KEEPALIVES = {"keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
"""TCP keepalives of the client's own connections where the conninfo sets none (the system's default
starts them after two hours idle): a server that vanished without closing the socket (a failover, a
cable) is noticed within about a minute, also by a read waiting on it, and the worker connects anew."""


def _extra(conninfo: str, application_name: Optional[str], timeout: Optional[float]) -> dict[str, Any]:
    extra: dict[str, Any] = {"application_name": application_name} if application_name else {}
    given = conninfo_to_dict(conninfo)
    if timeout is not None:
        extra["connect_timeout"] = max(2, math.ceil(timeout))  # libpq's least
    elif "connect_timeout" not in given and not os.environ.get("PGCONNECT_TIMEOUT"):
        extra["connect_timeout"] = CONNECT_TIMEOUT
    for name, seconds in KEEPALIVES.items():
        if name not in given:
            extra[name] = seconds
    return extra


def connect(
    conninfo: str, application_name: Optional[str] = None, timeout: Optional[float] = None
) -> psycopg.Connection[Row]:
    """``timeout``: seconds the connection attempt may take (libpq waits at least 2)."""
    extra = _extra(conninfo, application_name, timeout)
    with errors.translated():
        return psycopg.Connection.connect(conninfo, autocommit=True, prepare_threshold=None, **extra)


async def connect_async(
    conninfo: str, application_name: Optional[str] = None, timeout: Optional[float] = None
) -> psycopg.AsyncConnection[Row]:
    extra = _extra(conninfo, application_name, timeout)
    with errors.translated():
        return await psycopg.AsyncConnection.connect(conninfo, autocommit=True, prepare_threshold=None, **extra)


async def reconnect_async(
    old: Optional[psycopg.AsyncConnection[Row]],
    conninfo: str,
    application_name: str,
    stopping: Callable[[], bool],
    pause: Callable[[float], Awaitable[None]],
) -> Optional[psycopg.AsyncConnection[Row]]:
    """Closes ``old`` and connects again, retrying with a capped backoff (``pause`` waits between
    tries): the new connection, or None when a stop came first. An error of bussig's goes on up."""
    wait = RECONNECT_FIRST
    while not stopping():
        if old is not None:
            await old.close()
        try:
            return await connect_async(conninfo, application_name)
        except errors.BussigError:
            raise
        except psycopg.Error:
            await pause(wait)
            wait = next_pause(wait)
    return None


def execute(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...]) -> list[Row]:
    with errors.translated():
        cursor = conn.execute(sql, params, prepare=False)
        return [tuple(row) for row in cursor.fetchall()] if cursor.description is not None else []


async def execute_async(conn: psycopg.AsyncConnection[Any], sql: str, params: tuple[Any, ...]) -> list[Row]:
    with errors.translated():
        cursor = await conn.execute(sql, params, prepare=False)
        return [tuple(row) for row in await cursor.fetchall()] if cursor.description is not None else []


def _raw(connection: Any) -> Any:
    """The driver's connection under a SQLAlchemy pooled connection."""
    return getattr(connection, "driver_connection", None) or getattr(connection, "dbapi_connection", None)


def _not_begun(conn: Any) -> bool:
    """Whether ``conn`` is a SQLAlchemy (Async)Connection with no transaction begun: one on which
    nothing ran yet. Its transaction is begun as SQLAlchemy's own first statement would (autobegin):
    otherwise the driver's implicit transaction would carry the call, and a ``commit()`` of the
    Connection, knowing of no transaction, would not commit it."""
    in_transaction = getattr(conn, "in_transaction", None)
    return callable(in_transaction) and callable(getattr(conn, "begin", None)) and not in_transaction()


def caller_connection(conn: Any) -> psycopg.Connection[Any]:
    """The psycopg connection of ``conn``: itself, or under a SQLAlchemy Session or Connection (whose
    transaction it begins, as SQLAlchemy would for its own statement)."""
    if isinstance(conn, psycopg.Connection):
        return conn
    if hasattr(conn, "connection") and callable(getattr(conn, "get_bind", None)):  # a Session
        conn = conn.connection()
    elif _not_begun(conn):
        conn.begin()
    raw = _raw(getattr(conn, "connection", None))
    if isinstance(raw, psycopg.Connection):
        return raw
    raise TypeError(f"conn must be a psycopg Connection or a SQLAlchemy Session/Connection on psycopg, not {conn!r}")


async def caller_connection_async(conn: Any) -> psycopg.AsyncConnection[Any]:
    """As ``caller_connection``, for a psycopg AsyncConnection or a SQLAlchemy AsyncSession/AsyncConnection."""
    if isinstance(conn, psycopg.AsyncConnection):
        return conn
    if callable(getattr(conn, "get_bind", None)):  # an AsyncSession
        conn = await conn.connection()
    elif _not_begun(conn):
        await conn.begin()
    get_raw = getattr(conn, "get_raw_connection", None)
    if get_raw is not None:
        raw = _raw(await get_raw())
        if isinstance(raw, psycopg.AsyncConnection):
            return raw
    raise TypeError(
        f"conn must be a psycopg AsyncConnection or a SQLAlchemy AsyncSession/AsyncConnection on psycopg, not {conn!r}"
    )
