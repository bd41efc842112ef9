"""The store's write path: write-through, write-back on eviction, retries and flush.

``WritePath`` is a base of ``TieredStore`` and works on its state, all guarded
by ``self._lock`` (methods named ``*_locked`` expect it held):

  _host      the host tier (None without one)
  _writer    the background ``WriteBack`` (None without disk and remote tiers)
  _pending   key -> PendingWrite: evicted chunks not yet written, served from memory
  _through   key -> PendingWrite: write-through copies of host entries not yet written
  _retry     failed writes waiting for their back-off (``RetryQueue``)
  _counters  the store's counters

A chunk is in exactly one of: a dirty host entry (maybe also in ``_through``),
``_pending``, ``_retry``, or written down (a clean host entry, or gone).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import NamedTuple

from .storage.host_tier import HostEntry
from .write_back import MAX_WRITE_ATTEMPTS, PendingWrite, WriteResult

log = logging.getLogger(__name__)

ABANDON_LOG_INTERVAL_S = 10.0  # at most one "giving up" error line per this many seconds per store


class FlushReport(NamedTuple):
    written: int  # chunks written down during the flush (by it or by the writer thread)
    unwritten: int  # chunks still only in memory afterwards: dirty host entries and pending writes
    timed_out: bool  # the time limit ended the flush before everything was attempted


class WritePath:
    """Write-through, write-back, retries and flush of ``TieredStore`` (see the module docstring)."""

    # Class defaults, set per store under its lock by _abandon_locked.
    _abandon_logged_at = -math.inf  # time.monotonic() of the last error line about given-up writes
    _abandon_unlogged = 0  # writes given up since that line

    def _write_through_locked(self, job: PendingWrite) -> None:
        if self._writer.submit(job):
            self._through[job.key] = job
        else:
            self._counters.write_through_dropped += 1  # the entry stays dirty: eviction or flush writes it

    def _queue_locked(self, job: PendingWrite) -> bool:
        if self._writer is None or not self._writer.submit(job):
            return False
        self._pending[job.key] = job
        return True

    def _make_room_locked(self) -> bool:
        """Free one host slot, writing dirty victims back. False when impossible now."""
        assert self._host is not None
        while self._host.free_slots() == 0:
            victims = self._host.victims(1)
            if not victims:
                return False  # every entry is pinned
            key, entry = victims[0]
            through = self._through.pop(key, None)
            if through is not None:
                self._pending[key] = through  # already queued: served from its copy until written
            elif entry.dirty:
                job = PendingWrite(key, self._host.view(entry).clone(), entry.token_ids, entry.start_pos,
                                   entry.write_failures)
                if not self._queue_locked(job):
                    return False
            self._host.remove(key)
            self._counters.host_evictions += 1
        return True

    def _write_done(self, job: PendingWrite, result: WriteResult) -> None:
        with self._lock:
            self._record_write_locked(result)
            if self._through.get(job.key) is job:
                del self._through[job.key]
                entry = self._host.entry(job.key)
                if entry is not None:
                    self._settle_dirty_locked(job.key, entry, result.ok)  # a failure: dirty, retried later
                return
            if self._pending.get(job.key) is not job:
                return  # removed meanwhile
            retry = None if result.ok else self._retry.keep(job)
            if retry is not None:
                self._pending[job.key] = retry  # still served from memory meanwhile
            else:
                del self._pending[job.key]
                if not result.ok:
                    self._abandon_locked(job.key, job.failures + 1)

    def _resubmit_retries_locked(self) -> None:
        for job in self._retry.due():
            if not self._writer.submit(job):
                return
            self._retry.pop(job.key)

    def _abandon_locked(self, key: str, failures: int) -> None:
        """Count a given-up write; log at most one line per ``ABANDON_LOG_INTERVAL_S`` (an outage
        gives up every chunk, and the line is written under the store's lock)."""
        self._counters.writes_abandoned += 1
        self._abandon_unlogged += 1
        now = time.monotonic()
        if now - self._abandon_logged_at < ABANDON_LOG_INTERVAL_S:
            return
        log.error("chunk %s: giving up its write-back after %d failed writes (%d chunks given up since the "
                  "last such line; writes_abandoned counts them all)", key, failures, self._abandon_unlogged)
        self._abandon_logged_at, self._abandon_unlogged = now, 0

    def _record_write_locked(self, result: WriteResult) -> None:
        if not result.ok:
            self._counters.write_failures += 1
            return
        self._counters.writebacks += 1
        self._counters.raw_bytes_written += result.raw
        self._counters.encoded_bytes_written += result.encoded

    def flush_pending(self) -> None:
        """Wait until every queued write-back is written."""
        if self._writer is not None:
            self._writer.drain()

    def flush(self, timeout_s: float | None = None) -> FlushReport:
        """Write all pending and dirty host chunks down, so another process finds them.

        A chunk whose write fails stays in memory (dirty) for the next retry. With
        ``timeout_s`` the flush runs on its own thread and this returns after at
        most that long; what is unwritten by then stays in memory (and the thread
        goes on writing it).
        """
        if self._writer is None:
            return FlushReport(0, 0, False)
        with self._lock:
            before = self._counters.writebacks
        if timeout_s is None:
            self._flush_all()
            timed_out = False
        else:
            worker = threading.Thread(target=self._flush_all, name="lmcache-sgl-flush", daemon=True)
            worker.start()
            worker.join(timeout_s)
            timed_out = worker.is_alive()
        with self._lock:
            dirty = sum(self._host.entry(k).dirty for k in self._host.keys()) if self._host is not None else 0
            return FlushReport(self._counters.writebacks - before, dirty + len(self._pending), timed_out)

    def _flush_all(self) -> None:
        self.flush_pending()
        with self._lock:
            retries = self._retry.take_all()
        for job in retries:
            self._write_done(job, self._writer.write_now(job))
        if self._host is None:
            return
        with self._lock:
            dirty = [(k, e) for k in self._host.keys() if (e := self._host.entry(k)).dirty]
            for _, e in dirty:
                e.refs += 1  # flush writes the slot outside the lock: no eviction meanwhile
        for key, entry in dirty:
            self._write_dirty_entry(key, entry)

    def _write_dirty_entry(self, key: str, entry: HostEntry) -> None:
        """Write one pinned dirty entry and drop flush's pin, whatever the write does."""
        result = WriteResult(False, 0, 0)
        try:
            result = self._writer.write_now(PendingWrite(key, self._host.view(entry), entry.token_ids,
                                                         entry.start_pos))
        finally:
            with self._lock:
                entry.refs -= 1
                self._record_write_locked(result)
                self._settle_dirty_locked(key, entry, result.ok)

    def _settle_dirty_locked(self, key: str, entry: HostEntry, written: bool) -> None:
        if written:
            entry.dirty = False
            return
        entry.write_failures += 1
        if entry.write_failures >= MAX_WRITE_ATTEMPTS:
            entry.dirty = False  # given up: the next eviction drops it, knowingly
            self._abandon_locked(key, entry.write_failures)
