"""Messages as handlers and requesters get them."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

import psycopg

from .errors import NotInState


@dataclass
class _Delivery:
    """One delivery of a message: its lock token proves the holder may settle it."""

    queue: str
    message_id: int
    lock_token: uuid.UUID
    subject: Optional[str]
    payload: Any
    headers: dict[str, Any]
    delivery_count: int
    """1 on the first delivery."""
    priority: int
    enqueued_at: datetime
    correlation_id: Optional[str]
    reply_to: Optional[str]
    group_id: Optional[str] = None
    """The ordered group it was sent to: the group's next message waits until this one is settled."""
    replied: bool = field(default=False, init=False)
    """Whether ``reply`` answered it (and so acked it)."""

    def header(self, key: str) -> Optional[str]:
        """A header's value, when it is a string."""
        value = self.headers.get(key)
        return value if isinstance(value, str) else None


def _no_reply(payload: Any) -> Any:
    raise NotInState("this message cannot be replied to here (a reply itself, or read by hand)")


@dataclass
class Message(_Delivery):
    """A message a sync handler gets. ``conn`` is set for transactional handlers: the connection whose
    open transaction also acks the message."""

    conn: Optional[psycopg.Connection[Any]] = field(default=None, repr=False)
    _replier: Callable[[Any], Optional[int]] = field(default=_no_reply, repr=False)

    def reply(self, payload: Any) -> Optional[int]:
        """Answers this request (``bussig.reply``): acks it and sends ``payload`` to its ``reply_to``
        queue, correlated with it. The reply's id; None when the lock no longer held."""
        reply_id = self._replier(payload)
        self.replied = True
        return reply_id


@dataclass
class AsyncMessage(_Delivery):
    """A message an async handler gets; as ``Message``, with ``reply`` to await."""

    conn: Optional[psycopg.AsyncConnection[Any]] = field(default=None, repr=False)
    _replier: Callable[[Any], Awaitable[Optional[int]]] = field(default=_no_reply, repr=False)

    async def reply(self, payload: Any) -> Optional[int]:
        """As ``Message.reply``."""
        reply_id = await self._replier(payload)
        self.replied = True
        return reply_id


def fields(queue: str, row: tuple[Any, ...]) -> dict[str, Any]:
    """A row of ``_sql.COLUMNS`` as the keyword arguments of a message."""
    (message_id, token, subject, payload, headers, delivery_count, priority, enqueued_at) = row[:8]
    correlation_id, reply_to, group_id = row[8:]
    return dict(
        queue=queue,
        message_id=message_id,
        lock_token=token,
        subject=subject,
        payload=payload,
        headers=headers if isinstance(headers, dict) else {},
        delivery_count=delivery_count,
        priority=priority,
        enqueued_at=enqueued_at,
        correlation_id=correlation_id,
        reply_to=reply_to,
        group_id=group_id,
    )
