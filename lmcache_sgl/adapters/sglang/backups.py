"""Write-through backups (``save_policy``): device -> store copies on one worker thread.

The radix cache locks a path in the tree, submits a ``Backup`` and unlocks
the path only when the job is released here, so eviction cannot free slots
that a copy still reads. One worker runs the jobs in submission order; the
cache releases the leading finished jobs, as many as every TP rank has
finished (``RankAgreement``), so locks, and with them eviction, change alike
on every rank. Entries, in submission order::

    # [0, finished)          done on this rank; held until released
    # [finished, len(jobs))  queued or being copied: their slots stay locked

``discard`` (``/flush_cache``, shutdown: the tree is dropped) forgets every
entry; a copy still running then never reaches the store, since its slots may
be reused once the tree is gone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

MAX_JOBS = 64  # unreleased backups; beyond it a write-through is skipped and left to eviction


class Backup(NamedTuple):
    tokens: np.ndarray  # int64 token ids of the path from the root
    slots: torch.Tensor  # [len(tokens)] the path's device slots, locked in the tree until released
    chunks: tuple[int, ...]  # full chunks to save, ascending
    lock: Any  # the tree's lock on the path; opaque here


class _Entry:
    __slots__ = ("job", "epoch", "done")

    def __init__(self, job: Backup, epoch: int) -> None:
        self.job = job
        self.epoch = epoch
        self.done = threading.Event()


SaveFn = Callable[[Backup, Callable[[], bool]], object]  # (job, still_valid) -> anything


class BackupQueue:
    """Backups run by one worker thread and released in submission order."""

    def __init__(self, save: SaveFn, max_jobs: int = MAX_JOBS) -> None:
        self._save = save  # save(job, still_valid): must skip the put unless still_valid() after its copy
        self._max_jobs = max_jobs
        self._entries: deque[_Entry] = deque()  # unreleased, submission order; scheduler thread only
        self._queue: queue.SimpleQueue[_Entry | None] = queue.SimpleQueue()
        self._epoch = 0  # bumped by discard(); a job of an older epoch never puts
        self._thread: threading.Thread | None = None

    def submit(self, job: Backup) -> bool:
        """Queue ``job``; False (nothing queued) when ``max_jobs`` are unreleased. Equal on every rank."""
        if len(self._entries) >= self._max_jobs:
            return False
        entry = _Entry(job, self._epoch)
        self._entries.append(entry)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmcache-sgl-backup", daemon=True)
            self._thread.start()
        self._queue.put(entry)
        return True

    def unreleased(self) -> int:
        return len(self._entries)

    def finished(self) -> int:
        """Leading unreleased jobs done on this rank."""
        n = 0
        for entry in self._entries:
            if not entry.done.is_set():
                break
            n += 1
        return n

    def release(self, n: int) -> list[Backup]:
        """Forget the first ``n`` jobs (all finished) and return them, for the caller to unlock."""
        if n > self.finished():
            raise ValueError(f"release({n}): only {self.finished()} leading backups have finished")
        return [self._entries.popleft().job for _ in range(n)]

    def wait_finished(self, timeout_s: float) -> bool:
        """Block until every submitted job is done, at most ``timeout_s``; True if they all are."""
        deadline = time.monotonic() + timeout_s
        return all(entry.done.wait(max(0.0, deadline - time.monotonic())) for entry in list(self._entries))

    def discard(self) -> list[Backup]:
        """Forget every job (the tree is being dropped) and return them; running copies will not put."""
        self._epoch += 1
        jobs = [entry.job for entry in self._entries]
        self._entries.clear()
        return jobs

    def close(self, timeout_s: float = 1.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while (entry := self._queue.get()) is not None:
            epoch = entry.epoch
            try:
                # A copy that finishes before discard() bumps the epoch read slots the tree still held.
                self._save(entry.job, lambda: epoch == self._epoch)
            except Exception:  # noqa: BLE001 - a failed backup is a dropped one; eviction may save it
                log.exception("lmcache_sgl: a write-through backup of %d chunk(s) failed", len(entry.job.chunks))
            finally:
                entry.done.set()
