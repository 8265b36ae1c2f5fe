"""Every statement the client sends, with its parameters, for the sync and async flavours alike.

Parameters carry explicit casts and are never prepared on the server (the connections are opened with
``prepare_threshold=None``; statements on a caller's connection pass ``prepare=False``), so the client
also works through a transaction-pooling proxy such as pgbouncer.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Optional, Union

from psycopg.types.json import Jsonb

from . import trace

Seconds = Union[timedelta, float, int]
Params = tuple[Any, ...]

_OPTIONS = "%s::jsonb, %s::float8 * interval '1 second', %s::int4, %s::text, %s::text, %s::text, %s::text"
SEND = f"SELECT bussig.send(%s::text, %s::jsonb, {_OPTIONS})"
PUBLISH = f"SELECT bussig.publish(%s::text, %s::jsonb, {_OPTIONS})"

COLUMNS = (
    "message_id, lock_token, subject, payload, headers, delivery_count, priority, enqueued_at,"
    " correlation_id, reply_to, group_id"
)
ACK_AND_READ = (
    f"SELECT {COLUMNS} FROM bussig.ack_and_read(%s::text, %s::int8[], %s::uuid[], %s::int4,"
    " %s::float8 * interval '1 second', %s::float8 * interval '1 second')"
)
ACK = "SELECT bussig.ack(%s::text, %s::int8, %s::uuid)"
ACK_BATCH = "SELECT bussig.ack_batch(%s::text, %s::int8[], %s::uuid[])"
NACK = "SELECT bussig.nack(%s::text, %s::int8, %s::uuid, %s::float8 * interval '1 second', %s::text)"
EXTEND_LOCK = "SELECT bussig.extend_lock(%s::text, %s::int8, %s::uuid, %s::float8 * interval '1 second')"
DEAD_LETTER = "SELECT bussig.dead_letter(%s::text, %s::int8, %s::uuid, %s::text, %s::text)"
REPLY = "SELECT bussig.reply(%s::text, %s::int8, %s::uuid, %s::jsonb, %s::jsonb)"
QUEUE_DEPTH = "SELECT bussig.queue_depth(%s::text)"
SUBSCRIBE = "SELECT bussig.subscribe(%s::text, %s::text, %s::float8 * interval '1 second')"
HEARTBEAT = "SELECT bussig.heartbeat(%s::text)"
DROP_QUEUE = "SELECT bussig.drop_queue(%s::text)"
BLOCKED_GROUPS = "SELECT group_id, head_message_id, state, since FROM bussig.blocked_groups(%s::text)"

APPEND = "SELECT bussig.append(%s::text, %s::jsonb, %s::text, %s::jsonb, %s::text)"
APPEND_BATCH = "SELECT bussig.append_batch(%s::text, %s::jsonb[], %s::text[], %s::jsonb, %s::text[])"
STREAM_READ = (
    "SELECT partition, seq, lease_token, subject, key, payload, headers, appended_at"
    " FROM bussig.stream_read(%s::text, %s::text, %s::int4, %s::float8 * interval '1 second',"
    " %s::float8 * interval '1 second')"
)
CREATE_CONSUMER_GROUP = "SELECT bussig.create_consumer_group(%s::text, %s::text, %s::text)"
STREAM_COMMIT = "SELECT bussig.stream_commit(%s::text, %s::text, %s::int4, %s::int8, %s::uuid)"
STREAM_EXTEND_LEASE = (
    "SELECT bussig.stream_extend_lease(%s::text, %s::text, %s::int4, %s::uuid, %s::float8 * interval '1 second')"
)
STREAM_RELEASE = "SELECT bussig.stream_release(%s::text, %s::text, %s::int4, %s::uuid)"
STREAM_SEEK = "SELECT bussig.stream_seek(%s::text, %s::text, %s::int4, %s::int8)"
STREAM_SEEK_TIME = "SELECT bussig.stream_seek_time(%s::text, %s::text, %s::timestamptz)"

Ack = tuple[int, uuid.UUID]


def seconds(value: Optional[Seconds]) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def encode(payload: Any) -> Jsonb:
    """A payload as jsonb: plain JSON values, dataclasses, and pydantic models."""
    if dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        payload = dataclasses.asdict(payload)
    elif hasattr(payload, "model_dump"):
        payload = payload.model_dump(mode="json")
    return Jsonb(payload)


def message_params(
    target: str,
    payload: Any,
    headers: Optional[Mapping[str, Any]],
    delay: Optional[Seconds],
    priority: int,
    dedup_id: Optional[str],
    correlation_id: Optional[str],
    reply_to: Optional[str],
    group_id: Optional[str] = None,
) -> Params:
    """The parameters of SEND and PUBLISH; the headers gain the current trace context."""
    return (
        target,
        encode(payload),
        headers_param(headers),
        seconds(delay),
        priority,
        dedup_id,
        correlation_id,
        reply_to,
        group_id,
    )


def headers_param(headers: Optional[Mapping[str, Any]]) -> Optional[Jsonb]:
    """Headers as jsonb, with the current trace context added."""
    headers = trace.inject(headers)
    return Jsonb(dict(headers)) if headers is not None else None


def append_params(
    stream: str, payload: Any, subject: Optional[str], headers: Optional[Mapping[str, Any]], key: Optional[str]
) -> Params:
    return (stream, encode(payload), subject, headers_param(headers), key)


def append_batch_params(
    stream: str,
    payloads: Sequence[Any],
    subjects: Optional[Sequence[Optional[str]]],
    headers: Optional[Mapping[str, Any]],
    keys: Optional[Sequence[Optional[str]]],
) -> Params:
    """The parameters of APPEND_BATCH: ``headers`` is one object, every record's."""
    return (
        stream,
        [encode(payload) for payload in payloads],
        list(subjects) if subjects is not None else None,
        headers_param(headers),
        list(keys) if keys is not None else None,
    )


def ack_and_read_params(
    queue: str, acks: Sequence[Ack], max_messages: int, lock_timeout: Optional[float], wait: Optional[float]
) -> Params:
    ids = [message_id for message_id, _ in acks] or None
    tokens = [token for _, token in acks] or None
    return (queue, ids, tokens, max_messages, lock_timeout, wait)


def ack_batch_params(queue: str, acks: Sequence[Ack]) -> Params:
    return (queue, [message_id for message_id, _ in acks], [token for _, token in acks])


def reply_params(
    queue: str, message_id: int, token: uuid.UUID, payload: Any, headers: Optional[Mapping[str, Any]] = None
) -> Params:
    """The parameters of REPLY: the reply carries ``headers``, else the current trace context."""
    headers = headers or trace.inject(None)
    return (queue, message_id, token, encode(payload), Jsonb(dict(headers)) if headers else None)
