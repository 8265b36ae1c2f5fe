"""One exception hierarchy for every call: each SQLSTATE bussig documents has a class, with the
server's message kept, so callers can catch what went wrong without parsing text. A cancelled call
(57014) stays psycopg's ``QueryCanceled``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Optional, Union

import psycopg


class BussigError(Exception):
    """Anything bussig or the database reported; ``sqlstate`` is the server's code, when it sent one."""

    sqlstate: Optional[str] = None


class UnknownQueue(BussigError):
    """42704: no such queue, stream or consumer group (or role)."""


class InvalidArgument(BussigError):
    """22023: an argument breaks a rule (a queue, stream or group name, a subject, a batch size, a
    partition or seq, ...)."""


class NullArgument(BussigError):
    """22004: NULL where a value is needed."""


class TooLarge(BussigError):
    """54000: a message larger than bussig.max_message_size."""


class PermissionDenied(BussigError):
    """42501: the role lacks the privilege on the queue."""


class NotInState(BussigError):
    """55000: not allowed in this state (a reply to a request without reply_to, ...)."""


class InUse(BussigError):
    """2BP01: other queues still send their dead letters to this one."""


class NotSupported(BussigError):
    """0A000: not supported."""


class InvalidSetting(BussigError):
    """42602: ``SET bussig.<name>`` for a setting bussig does not have."""


class Corrupted(BussigError):
    """XX001: a message whose payload is in neither its row nor its shared body row."""


class NoExtension(BussigError):
    """The database has no bussig (undefined schema, table or function)."""


class RequestTimeout(BussigError, TimeoutError):
    """No reply came within the time a request allowed."""

    def __init__(self, timeout: Union[float, timedelta]) -> None:
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        super().__init__(f"no reply within {seconds:g} s")
        self.timeout = seconds


class LeftLocked(BussigError):
    """A stop could not reach the database to hand in what the worker held before its time ran out:
    those messages stay locked until their locks run out, then are delivered again (the finished ones
    among them too: their acks were not sent)."""

    def __init__(self, queue: str, held: int) -> None:
        super().__init__(
            f"the database could not be reached to hand in {held} message(s) of queue {queue!r};"
            " they are delivered again once their locks run out"
        )
        self.queue = queue
        self.held = held


_BY_SQLSTATE: dict[str, type[BussigError]] = {
    "42704": UnknownQueue,
    "22023": InvalidArgument,
    "22004": NullArgument,
    "54000": TooLarge,
    "42501": PermissionDenied,
    "55000": NotInState,
    "2BP01": InUse,
    "0A000": NotSupported,
    "42602": InvalidSetting,
    "XX001": Corrupted,
    "3F000": NoExtension,
    "42P01": NoExtension,
    "42883": NoExtension,
}


def connection_lost(error: BaseException, connection: Optional[psycopg.BaseConnection[object]] = None) -> bool:
    """Whether ``error`` means the connection is gone (closed, reset, the backend terminated)."""
    if connection is not None and (connection.closed or connection.broken):
        return True
    return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)) and not isinstance(
        error, psycopg.errors.QueryCanceled
    )


def transient(error: BaseException) -> bool:
    """Whether a call failed on its own and may be made again on the same connection: cancelled (a
    ``statement_timeout``, 57014) or lost to a serialization failure or a deadlock (40001, 40P01). Its
    transaction rolled back, with any acks it carried."""
    return getattr(error, "sqlstate", None) in ("57014", "40001", "40P01")


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Re-raises a database error with a documented SQLSTATE as its bussig class."""
    try:
        yield
    except psycopg.Error as error:
        kind = _BY_SQLSTATE.get(error.sqlstate or "")
        if kind is None:
            raise
        mapped = kind(error.diag.message_primary or str(error))
        mapped.sqlstate = error.sqlstate
        raise mapped from error
