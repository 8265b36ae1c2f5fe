"""Stream records as readers get them, and what the thread and asyncio stream consumers share: a
batch cut into partitions, and the progress each partition's handling made, with no I/O of its own."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

from ._connections import Row

log = logging.getLogger("bussig.stream")

CANCEL_EVERY = 0.5
"""How often a stop cancels an idle read again while it lasts (seconds)."""
CANCELED_COMMIT_ATTEMPTS = 3
"""How often a consumer sends a commit a stop's cancel (meant for an idle read) cut off."""


@dataclass(frozen=True)
class StreamRecord:
    """One record of a stream, as a consumer group read it. ``lease_token`` is the lease of its
    partition (one per partition and read): commit with it."""

    stream: str
    consumer_group: str
    partition: int
    seq: int
    """1, 2, 3... within the partition, in the order records became readable."""
    lease_token: uuid.UUID
    subject: Optional[str]
    key: Optional[str]
    payload: Any
    headers: dict[str, Any]
    appended_at: datetime

    def header(self, key: str) -> Optional[str]:
        """A header's value, when it is a string."""
        value = self.headers.get(key)
        return value if isinstance(value, str) else None


def records(stream: str, group: str, rows: list[Row]) -> list[StreamRecord]:
    """Rows of ``_sql.STREAM_READ`` as records."""
    return [
        StreamRecord(stream, group, partition, seq, token, subject, key, payload, headers or {}, at)
        for partition, seq, token, subject, key, payload, headers, at in rows
    ]


def by_partition(batch: list[StreamRecord]) -> list[list[StreamRecord]]:
    """A read's records, one list per partition in seq order (a read returns partitions interleaved)."""
    partitions: dict[int, list[StreamRecord]] = {}
    for record in batch:
        partitions.setdefault(record.partition, []).append(record)
    return [sorted(records, key=lambda record: record.seq) for records in partitions.values()]


@dataclass
class StreamStats:
    """What a stream consumer has done so far; read it while it runs."""

    handled: int = 0
    failed: int = 0
    """Handler exceptions: each stopped its partition's batch there."""
    commits: int = 0
    stale_commits: int = 0
    """Commits the server refused (the lease had passed to another member): those records are read again."""
    reconnects: int = 0


@dataclass
class Progress:
    """How far the handling of one partition's records of a batch got."""

    records: list[StreamRecord]
    handled: int = 0
    failed: bool = False

    @property
    def commit(self) -> Optional[tuple[int, int, uuid.UUID]]:
        """(partition, seq, lease_token) of the last record handled; None when none was."""
        if self.handled == 0:
            return None
        last = self.records[self.handled - 1]
        return (last.partition, last.seq, last.lease_token)


def stopped_early(record: StreamRecord, stopping: bool, lease_ends: float, now: float) -> bool:
    """Whether ``record`` should be left to a later read: on a stop, or once the lease has run out
    (another member may have the partition now, and handling on would break its order)."""
    if stopping:
        return True
    if now >= lease_ends:
        log.warning(
            "the lease on %s/%s partition %d ran out at seq %d: the rest is read again",
            record.stream,
            record.consumer_group,
            record.partition,
            record.seq,
        )
        return True
    return False


def failed(progress: Progress, record: StreamRecord) -> None:
    progress.failed = True
    log.exception(
        "the handler failed on %s/%s partition %d seq %d: the partition's rest of the batch is read again",
        record.stream,
        record.consumer_group,
        record.partition,
        record.seq,
    )


def committed(stats: StreamStats, stream: str, group: str, partition: int, seq: int, ok: bool) -> None:
    if ok:
        stats.commits += 1
    else:
        stats.stale_commits += 1
        log.info("stale lease on %s/%s partition %d at seq %d: the records are read again", stream, group, partition, seq)
