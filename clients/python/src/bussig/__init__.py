"""bussig: send to bussig queues in your own transactions, route subjects to handlers, and run workers
that ack, retry, dead-letter, extend locks and stop without leaving a message locked; append to streams
and consume them in consumer groups."""

from ._core import Stats
from .aio import AsyncBus
from .bus import BlockedGroup, Bus
from .errors import (
    BussigError,
    InUse,
    InvalidArgument,
    LeftLocked,
    NoExtension,
    NotInState,
    NotSupported,
    InvalidSetting,
    Corrupted,
    NullArgument,
    PermissionDenied,
    RequestTimeout,
    TooLarge,
    UnknownQueue,
)
from .message import AsyncMessage, Message
from .outcome import DeadLetter, Retry
from .routing import Route, Router, pattern_matches
from .stream import StreamRecord, StreamStats
from .stream_consumer import StreamConsumer
from .worker import Worker

__all__ = [
    "AsyncBus",
    "AsyncMessage",
    "BlockedGroup",
    "Bus",
    "BussigError",
    "DeadLetter",
    "InUse",
    "InvalidArgument",
    "LeftLocked",
    "Message",
    "NoExtension",
    "NotInState",
    "NotSupported",
    "InvalidSetting",
    "Corrupted",
    "NullArgument",
    "PermissionDenied",
    "RequestTimeout",
    "Retry",
    "Route",
    "Router",
    "Stats",
    "StreamConsumer",
    "StreamRecord",
    "StreamStats",
    "TooLarge",
    "UnknownQueue",
    "Worker",
    "pattern_matches",
]
