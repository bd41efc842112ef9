"""The background writer: encodes chunks and writes them to the lower tiers.

Callers hand over a private copy of a chunk (``PendingWrite``); the writer
thread encodes it once and writes the same blob to disk and remote. The queue
is bounded: ``submit`` never blocks, it returns False when the queue is full.
While a chunk waits, the store serves it from ``PendingWrite.kv``.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable

import torch

from .storage.chunk_file import encode_chunk

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PendingWrite:
    key: str
    kv: torch.Tensor  # private CPU copy, [L, P, T, H, D]
    token_ids: bytes
    start_pos: int


class WriteBack:
    def __init__(self, sinks: list, fingerprint: dict, codec: str, byte_shuffle: bool,
                 max_pending: int, pool: Executor, on_done: Callable[[PendingWrite, int, int], None]) -> None:
        """``sinks`` have ``write(key, blob) -> bool``; ``on_done(job, raw, encoded)`` runs after each job."""
        self._sinks = sinks
        self._fingerprint = fingerprint
        self._codec = codec
        self._shuffle = byte_shuffle
        self._pool = pool
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

    def write_now(self, job: PendingWrite) -> tuple[int, int]:
        """Encode and write in the calling thread. Returns (raw bytes, encoded bytes)."""
        blob = encode_chunk(job.key, self._fingerprint, job.token_ids, job.kv, codec=self._codec,
                            byte_shuffle=self._shuffle, start_pos=job.start_pos, pool=self._pool)
        for sink in self._sinks:
            sink.write(job.key, blob)
        return job.kv.numel() * job.kv.element_size(), len(blob)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            raw = encoded = 0
            try:
                raw, encoded = self.write_now(job)
            except Exception:  # a bug or an OS error must not kill the writer
                log.exception("write-back of chunk %s failed", job.key)
            finally:
                self._on_done(job, raw, encoded)
                self._queue.task_done()
        self._queue.task_done()

    def drain(self) -> None:
        """Block until every submitted job is written."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
