"""What a handler's end means for its message, decided once for every flavour of worker."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from . import trace
from ._sql import Seconds, seconds


class Retry(Exception):
    """Raise from a handler to give the message back, ready again after ``delay`` (timedelta or
    seconds; None: the queue's backoff)."""

    def __init__(self, delay: Optional[Seconds] = None, error: Optional[str] = None) -> None:
        self.delay = seconds(delay)
        self.error = error or (f"retry after {self.delay:g} s" if self.delay is not None else "retry")
        super().__init__(self.error)


class DeadLetter(Exception):
    """Raise from a handler to move the message to its dead-letter queue with ``reason``."""

    def __init__(self, reason: str = "rejected", error: Optional[str] = None) -> None:
        self.reason = reason
        self.error = error
        super().__init__(reason if error is None else f"{reason}: {error}")


@dataclass(frozen=True)
class Ack:
    """Done: acked with the next read (or in the handler's transaction)."""


@dataclass(frozen=True)
class Reply:
    """Done, with an answer: ``bussig.reply`` acks the request and sends ``value``."""

    value: Any
    headers: Optional[Mapping[str, Any]] = None
    """The handler's trace context, taken while its span was current."""


@dataclass(frozen=True)
class Nack:
    delay: Optional[float]
    error: str


@dataclass(frozen=True)
class Bury:
    """To the dead-letter queue."""

    reason: str
    error: Optional[str]


@dataclass(frozen=True)
class Settled:
    """Nothing left to do: the handler replied itself, or its transaction acked."""


Outcome = Union[Ack, Reply, Nack, Bury, Settled]


def of_return(value: Any, reply_to: Optional[str], replied: bool) -> Outcome:
    if replied:
        return Settled()
    if reply_to is not None and value is not None:
        return Reply(value, trace.inject(None))
    return Ack()


def of_exception(error: Exception) -> Outcome:
    if isinstance(error, Retry):
        return Nack(error.delay, error.error)
    if isinstance(error, DeadLetter):
        return Bury(error.reason, error.error)
    text = str(error)
    return Nack(None, f"{type(error).__name__}: {text}" if text else type(error).__name__)


class LockLost(Exception):
    """The message's lock no longer held when a transactional handler came to ack it: another
    delivery does the work, so the handler's transaction rolls back."""

    def __init__(self, message_id: int, token: uuid.UUID) -> None:
        super().__init__(f"the lock of message {message_id} ran out before the handler's transaction committed")


GIVE_BACK = Nack(0.0, "the worker stopped")
UNDECODABLE = "undecodable"
UNROUTABLE = "unroutable"
