"""Counters of the store, and the immutable snapshot ``TieredStore.stats()`` returns."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import NamedTuple


class Tier(str, Enum):
    HOST = "host"
    DISK = "disk"
    REMOTE = "remote"


def _per_tier() -> dict[str, int]:
    return {t.value: 0 for t in Tier}


@dataclass(slots=True)
class Counters:
    """Mutable counters; the store updates them under its lock."""

    lookups: int = 0
    hit_chunks: dict[str, int] = field(default_factory=_per_tier)  # chunks served by get, per tier
    miss_chunks: int = 0
    put_chunks: int = 0
    puts_dropped: int = 0  # no room and the write queue full
    host_evictions: int = 0
    writebacks: int = 0  # chunks written to disk/remote (successful writes only)
    write_failures: int = 0  # failed write attempts; the chunk stays in memory for a retry
    writes_abandoned: int = 0  # chunks given up after MAX_WRITE_ATTEMPTS failures (or no room to retry)
    raw_bytes_written: int = 0
    encoded_bytes_written: int = 0
    corrupt_chunks: int = 0  # failed verification: never served
    cut_by_cost: int = 0  # lookups shortened because recompute beats loading
    write_through_dropped: int = 0  # write-throughs refused by a full queue; the chunk stays dirty in host RAM


@dataclass(frozen=True, slots=True)
class StoreStats:
    lookups: int
    hit_chunks: dict[str, int]
    miss_chunks: int
    put_chunks: int
    puts_dropped: int
    host_evictions: int
    writebacks: int
    write_failures: int
    writes_abandoned: int
    raw_bytes_written: int
    encoded_bytes_written: int
    corrupt_chunks: int
    cut_by_cost: int
    host_entries: int
    host_bytes: int
    host_capacity_bytes: int
    disk_entries: int
    disk_bytes: int
    disk_evictions: int
    disk_quarantined: int
    disk_write_errors: int
    remote_errors: int
    remote_breaker_trips: int  # the remote tier stopped answering and was skipped for a back-off
    pending_writes: int
    write_through_dropped: int = 0  # see Counters

    @property
    def compression_ratio(self) -> float:
        """Raw over encoded bytes of everything written down so far (1.0 before any write)."""
        return self.raw_bytes_written / self.encoded_bytes_written if self.encoded_bytes_written else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "compression_ratio": self.compression_ratio}


class TimedEvent(NamedTuple):
    kind: str  # what was timed, e.g. "load", "save", "prefetch_wait"
    seconds: float
    nbytes: int  # bytes moved by it (0 for a wait)


class Timings:
    """Per-event durations for latency histograms; an exporter drains them. Thread-safe.

    Holds at most ``max_events`` undrained events: when nobody drains, the
    oldest are dropped (and counted in ``dropped``), so memory stays bounded.
    """

    def __init__(self, max_events: int = 10_000) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self._events: deque[TimedEvent] = deque(maxlen=max_events)
        self._lock = threading.Lock()
        self.dropped = 0

    def record(self, kind: str, seconds: float, nbytes: int = 0) -> None:
        with self._lock:
            if len(self._events) == self._events.maxlen:
                self.dropped += 1
            self._events.append(TimedEvent(kind, seconds, nbytes))

    def drain(self) -> list[TimedEvent]:
        """The events recorded since the last drain, oldest first."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
            return events
