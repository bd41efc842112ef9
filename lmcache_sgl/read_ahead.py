"""Read-ahead for ``get`` and ``borrow``: lower-tier chunks read and decoded on the I/O pool in parallel.

``TieredStore.get`` and ``borrow`` walk their keys in order and stop at the
first miss. A key not in host memory needs a read (a disk file or a Redis
value), a checksum and a decode: one core's work per chunk. ``ReadAhead``
keeps the next ``window`` such keys in flight on the store's I/O pool and hands
their results back in key order; the store accepts them one at a time (counts
the hit, promotes it, copies it out) and stops where it stops.

Contract:
  - A read changes no store state: it returns a ``LowerRead`` (the chunk, and
    why each tier's copy was refused). Only the store, in key order, quarantines,
    counts and promotes; so a read beyond the first miss or corrupt chunk is
    dropped without a trace (``close`` cancels the reads not yet started).
  - A read on the pool decodes its blocks on its own thread and never waits on
    the pool, so a full window cannot starve itself. A store called from an I/O
    pool thread passes ``pool=None``: every read is then inline, as is a lone
    read (its blocks decoded on the pool: faster for one chunk).
  - A key in host memory when its turn to be submitted comes is skipped; if it
    is gone when the store reaches it, it is read inline then.

Index ranges of one get of n keys, the store at key i:
  # [0, i)             accepted (or served from host memory)
  # [i, i + window)    submitted unless in host memory then; read in parallel
  # [i + window, n)    not read yet
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Executor, Future
from typing import Callable, NamedTuple

import torch

from .cost_model import CostModel
from .metrics import Tier
from .storage.chunk_file import ChunkHeader

IO_THREAD_PREFIX = "lmcache-sgl-io"  # the store's I/O pool threads are named so


def on_io_thread() -> bool:
    """True on an I/O pool thread: work there must not wait on the pool."""
    return threading.current_thread().name.startswith(IO_THREAD_PREFIX)


class LowerRead(NamedTuple):
    """One key's read from disk, then remote; not yet accepted by the store."""
    tier: Tier | None  # the tier of the valid copy; None: no tier holds one
    header: ChunkHeader | None
    kv: torch.Tensor | None  # [L, P, T, H, D], decoded, owned by the reader
    corrupt: tuple[tuple[Tier, str], ...]  # tiers whose copy failed verification, and why


ReadFn = Callable[[int, Executor | None], LowerRead]  # (key index, pool for block decoding)


class ReadAhead:
    """The lower-tier reads of one get or borrow; not thread-safe (one caller)."""

    __slots__ = ("_read", "_skip", "_count", "_pool", "_window", "_cost", "_futures", "_next",
                 "_started", "_last", "_bytes")

    def __init__(self, read: ReadFn, skip: Callable[[int], bool], count: int, pool: Executor | None,
                 window: int, cost: CostModel) -> None:
        self._read = read
        self._skip = skip  # key i is in host memory now: not worth submitting
        self._count = count
        self._pool = pool
        self._window = window
        self._cost = cost
        self._futures: dict[int, Future] = {}
        self._next = 0  # keys [0, _next) were considered for submission
        self._started: float | None = None  # when the first read began
        self._last = 0.0  # when the last accepted read was accepted
        self._bytes: dict[Tier, int] = {}  # raw bytes accepted per tier

    def result(self, i: int) -> LowerRead:
        """The read of key ``i``; ask in increasing ``i``, once each."""
        if self._started is None:
            self._started = time.perf_counter()
        self._submit_ahead(i)
        future = self._futures.pop(i, None)
        return future.result() if future is not None else self._read(i, self._pool)

    def _submit_ahead(self, i: int) -> None:
        """Keep keys [i, i + window) in flight on the pool (a lone read of key i stays inline)."""
        if self._pool is None or self._window < 2:
            return
        todo = [j for j in range(max(self._next, i), min(self._count, i + self._window))
                if j == i or not self._skip(j)]
        if todo == [i] and not self._futures:
            return
        for j in todo:
            self._futures[j] = self._pool.submit(self._read, j, None)
        self._next = max(self._next, i + self._window)

    def accepted(self, read: LowerRead) -> None:
        """The store returns ``read``'s chunk: its bytes count towards its tier's bandwidth."""
        self._bytes[read.tier] = self._bytes.get(read.tier, 0) + read.header.raw_len
        self._last = time.perf_counter()

    def close(self) -> None:
        """Cancel the reads not started (running ones finish; their results are dropped); record bandwidth."""
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        # One observation per tier for the whole call: overlapping reads each take longer
        # than the throughput the caller saw, so a read's own time would understate it.
        for tier, nbytes in self._bytes.items():
            self._cost.record_load(tier, nbytes, self._last - self._started)
        self._bytes.clear()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
