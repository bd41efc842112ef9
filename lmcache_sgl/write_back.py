"""The background writer: encodes chunks and writes them to the lower tiers.

Callers hand over a private copy of a chunk (``PendingWrite``): an evicted
host entry (write-back) or, under ``disk_write_policy: write_through``, every
put. The writer thread drains the queue continuously, encoding each chunk once
and writing the same blob to disk and remote, so a chunk is durable (fsynced
and renamed into place) about (its queue position + 1) chunk writes after
``submit``: at most ``max_pending_writes`` of them. The queue is bounded:
``submit`` never blocks, it returns False when the queue is full. While a
chunk waits, the store serves it from ``PendingWrite.kv``.

A write succeeds when at least one sink stored the blob (the chunk then
survives leaving memory). ``write_now`` never raises: an encode error, a sink
returning False or a sink raising is a failed ``WriteResult``; the store keeps
such a chunk in memory and retries it (``RetryQueue``), at most
``MAX_WRITE_ATTEMPTS`` times.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch

from .storage.chunk_file import encode_chunk

log = logging.getLogger(__name__)

# Writes of one chunk before the store gives up on it (counted in writes_abandoned):
# enough to ride out a transient error (a full disk that the tier trims, a Redis
# restart), few enough that a broken disk costs a bounded number of encodes.
MAX_WRITE_ATTEMPTS = 3
# Before a put resubmits a failed write in the background; doubles with each failure.
# A flush retries at once.
RETRY_DELAY_S = 0.5


@dataclass(frozen=True, slots=True)
class PendingWrite:
    key: str
    kv: torch.Tensor  # private CPU copy, [L, P, T, H, D]
    token_ids: bytes
    start_pos: int
    failures: int = 0  # failed writes of this chunk so far
    retry_at: float = 0.0  # time.monotonic() before which a background retry waits


class WriteResult(NamedTuple):
    ok: bool  # stored by at least one sink
    raw: int  # bytes of the chunk tensor
    encoded: int  # bytes of the blob (0 when encoding failed)


class RetryQueue:
    """Failed writes waiting for a retry, bounded in count and in attempts per chunk.

    Not thread-safe: the store holds its lock around every call.
    """

    def __init__(self, max_jobs: int) -> None:
        self._max_jobs = max_jobs
        self._jobs: dict[str, PendingWrite] = {}  # insertion order: oldest failure first

    def __len__(self) -> int:
        return len(self._jobs)

    def keep(self, job: PendingWrite) -> PendingWrite | None:
        """Count one more failure of ``job``: the job to retry, or None once it must be given up."""
        failures = job.failures + 1
        self._jobs.pop(job.key, None)
        if failures >= MAX_WRITE_ATTEMPTS or len(self._jobs) >= self._max_jobs:
            return None
        delay = RETRY_DELAY_S * 2 ** (failures - 1)
        retry = replace(job, failures=failures, retry_at=time.monotonic() + delay)
        self._jobs[job.key] = retry
        return retry

    def due(self) -> list[PendingWrite]:
        """The jobs whose back-off has passed, oldest first (still held until ``pop``)."""
        now = time.monotonic()
        return [job for job in self._jobs.values() if job.retry_at <= now]

    def take_all(self) -> list[PendingWrite]:
        jobs = list(self._jobs.values())
        self._jobs.clear()
        return jobs

    def pop(self, key: str) -> None:
        self._jobs.pop(key, None)

    def clear(self) -> None:
        self._jobs.clear()


class WriteBack:
    def __init__(self, sinks: list, fingerprint: dict, codec: str, byte_shuffle: bool,
                 max_pending: int, threads: int, nice: int,
                 on_done: Callable[[PendingWrite, WriteResult], None]) -> None:
        """``sinks`` have ``write(key, blob) -> bool``; ``on_done(job, result)`` runs after each job.

        Writes are encoded on a pool of their own, apart from the reads that requests wait on,
        and the writer's threads run ``nice`` steps below the engine's: a background write
        never takes a core from the forward or from a read.
        """
        self._sinks = sinks
        self._fingerprint = fingerprint
        self._codec = codec
        self._shuffle = byte_shuffle
        self._nice = nice
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lmcache-sgl-write",
                                        initializer=lower_thread_priority, initargs=(nice,))
        self._on_done = on_done
        self._queue: queue.Queue[PendingWrite | None] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="lmcache-sgl-writer", daemon=True)
        self._thread.start()

    def submit(self, job: PendingWrite) -> bool:
        try:
            self._queue.put_nowait(job)
            return True
        except queue.Full:
            return False

    def full(self) -> bool:
        return self._queue.full()

    def pending(self) -> int:
        return self._queue.qsize()

    def write_now(self, job: PendingWrite) -> WriteResult:
        """Encode and write in the calling thread; every failure is a result, never an exception."""
        raw = job.kv.numel() * job.kv.element_size()
        try:
            blob = encode_chunk(job.key, self._fingerprint, job.token_ids, job.kv, codec=self._codec,
                                byte_shuffle=self._shuffle, start_pos=job.start_pos, pool=self._pool)
        except Exception:  # a bug must cost this chunk's write, not the caller
            log.exception("cannot encode chunk %s for write-back", job.key)
            return WriteResult(False, raw, 0)
        stored = [self._write_sink(sink, job.key, blob) for sink in self._sinks]
        return WriteResult(any(stored), raw, len(blob))

    @staticmethod
    def _write_sink(sink, key: str, blob: bytes) -> bool:
        try:
            return bool(sink.write(key, blob))
        except Exception:  # an OS error or a bug in one sink is that sink's failed write
            log.exception("write-back of chunk %s to %s failed", key, type(sink).__name__)
            return False

    def _run(self) -> None:
        lower_thread_priority(self._nice)
        while (job := self._queue.get()) is not None:
            result = WriteResult(False, 0, 0)
            try:
                result = self.write_now(job)
            except Exception:  # a bug must not kill the writer
                log.exception("write-back of chunk %s failed", job.key)
            finally:
                self._on_done(job, result)
                self._queue.task_done()
        self._queue.task_done()

    def drain(self) -> None:
        """Block until every submitted job is written."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._pool.shutdown(wait=True)


def lower_thread_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` steps (Linux: nice is per thread)."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError):  # no per-thread priority here: writes simply compete as before
        pass
