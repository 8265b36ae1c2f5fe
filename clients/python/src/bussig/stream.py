"""Stream records as readers get them, and what the thread and asyncio stream consumers share: a
batch cut into partitions, and the progress each partition's handling made, with no I/O of its own."""

from __future__ import annotations

import logging
import time
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
    releases: int = 0
    """Leases ended at a stop on partitions of which nothing was handled: any member reads those
    records at once."""
    extensions: int = 0
    """Leases kept longer while their partition was still being handled."""
    reconnects: int = 0


Settlement = tuple[int, Optional[int], uuid.UUID]
"""What ends a partition's lease after a batch: (partition, seq, lease_token) commits up to ``seq``;
with ``seq`` None it releases the lease."""


@dataclass
class Progress:
    """How far the handling of one partition's records of a batch got. The consumer's loop extends the
    lease while ``done`` is false; the handler reads ``lease_ends`` and ``lost`` before each record."""

    records: list[StreamRecord]
    lease_ends: float = 0.0
    """When the lease runs out (``time.monotonic()``), as far as this member knows."""
    handled: int = 0
    failed: bool = False
    lost: bool = False
    """An extension was refused: another member has the partition."""
    done: bool = False
    retry_at: float = 0.0
    """After a failed extension, when to try again (``time.monotonic()``): not every turn of the loop."""

    @property
    def lease_token(self) -> uuid.UUID:
        return self.records[0].lease_token

    @property
    def settlement(self) -> Optional[Settlement]:
        """Commit the last record handled. With none handled (a stop), release the lease, so that any
        member reads the records at once; not after a handler failed on the first record, whose lease
        runs out instead (a record that keeps failing is retried once per lease, not in a busy loop),
        nor once the lease was lost."""
        partition = self.records[0].partition
        if self.handled > 0:
            return (partition, self.records[self.handled - 1].seq, self.lease_token)
        if self.failed or self.lost:
            return None
        return (partition, None, self.lease_token)


def extend_due(batch: list[Progress], lease: float, now: float) -> list[Progress]:
    """Partitions still being handled whose lease has less than two thirds left: extended about every
    third of the lease (and at once after a read that waited long before it found records)."""
    return [p for p in batch if not p.done and not p.lost and now >= max(p.lease_ends - lease * 2 / 3, p.retry_at)]


def next_extension(batch: list[Progress], lease: float, now: float) -> float:
    """Seconds until ``extend_due`` has something (the loop's wait for its handlers)."""
    due = [max(p.lease_ends - lease * 2 / 3, p.retry_at) for p in batch if not p.done and not p.lost]
    return max(0.01, min(due, default=now + lease / 3) - now)


def extended(stats: StreamStats, progress: Progress, ok: bool, since: float, lease: float) -> None:
    """Applies an extension's answer (``since``: when it was sent)."""
    record = progress.records[0]
    if ok:
        stats.extensions += 1
        progress.lease_ends = since + lease
    else:
        progress.lost = True
        log.warning(
            "another member has leased %s/%s partition %d: its records from seq %d are not handled further here",
            record.stream,
            record.consumer_group,
            record.partition,
            record.seq,
        )


EXTENSION_RETRY = 1.0
"""Seconds between tries of an extension that failed (the database out of reach)."""


def extension_failed(progress: Progress) -> None:
    progress.retry_at = time.monotonic() + EXTENSION_RETRY
    record = progress.records[0]
    log.warning(
        "could not extend the lease on %s/%s partition %d: handling goes on until it runs out",
        record.stream,
        record.consumer_group,
        record.partition,
        exc_info=True,
    )


def stopped_early(record: StreamRecord, stopping: bool, progress: Progress, now: float) -> bool:
    """Whether ``record`` should be left to a later read: on a stop, or once the lease was lost or has
    run out (another member may have the partition now, and handling on would break its order)."""
    if stopping or progress.lost:
        return True
    if now >= progress.lease_ends:
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


def settled(stats: StreamStats, stream: str, group: str, settlement: Settlement, ok: bool) -> None:
    """Counts and logs the answer to a commit or release."""
    partition, seq, _ = settlement
    if seq is None:
        if ok:
            stats.releases += 1
        else:
            log.info("stale lease on %s/%s partition %d: another member has it already", stream, group, partition)
    elif ok:
        stats.commits += 1
    else:
        stats.stale_commits += 1
        log.info(
            "stale lease on %s/%s partition %d at seq %d: the records are read again", stream, group, partition, seq
        )
