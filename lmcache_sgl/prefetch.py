"""Prefetch: read a prompt's leading chunks into pinned host slots on background threads.

``TieredStore.prefetch(keys, token_ids_per_key)`` returns a ``PrefetchHandle``
at once. Chunks already in host memory are pinned on the calling thread (no
I/O, only the store's lock); the rest are read, verified, decoded and promoted
into host slots by a prefetch thread, in key order, one chunk after another.
The engine polls ``progress()`` and admits the request with the chunks that
have arrived: ``ready`` only grows, and every chunk in ``[0, ready)`` stays in
host memory (pinned, or a private copy) until the handle is released.

Contract:
  - The first chunk that is missing, corrupt (quarantined by the store) or
    fails to read ends the prefetch: ``done`` with ``ready`` = its index.
  - ``cancel()`` stops after the chunk being read; the pins are dropped once
    the thread has stopped. ``release(after=event)`` drops them after the
    transfer reading the slots completes (CUDA), or at once. Both are idempotent
    and safe from any thread; a handle never leaks a pin.
  - Driver threads are the prefetcher's own: block decoding runs on the store's
    I/O pool, and a driver waiting on that pool must not occupy one of its threads.

Index ranges of one prefetch of n keys:
  # [0, ready)      in host memory now, pinned for the handle
  # [ready, n)      being read, or never (done: a miss or a corrupt chunk ended the hit)
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch

from .keys import token_bytes
from .metrics import Tier
from .storage.host_tier import HostEntry

if TYPE_CHECKING:
    from .tiered_store import TieredStore, TokenIds

log = logging.getLogger(__name__)


class PrefetchProgress(NamedTuple):
    ready: int  # leading chunks in host memory now
    total: int  # chunks asked for
    done: bool  # nothing more will arrive (all read, a miss or corrupt chunk, or cancelled)


class Fetched(NamedTuple):
    kv: torch.Tensor  # [L, P, T, H, D]: a pinned host slot's view, or a private copy without a slot
    entry: HostEntry | None  # the pinned entry, None for a private copy
    tier: Tier  # where the chunk was when the prefetch asked for it


class PrefetchHandle:
    """One prefetch's progress and pins. Thread-safe."""

    __slots__ = ("keys", "_tokens", "_store", "_lock", "_fetched", "_done", "_cancelled", "_released",
                 "_running", "_changed", "_after")

    def __init__(self, store: "TieredStore", keys: Sequence[str], tokens: Sequence[bytes | None]) -> None:
        self.keys = tuple(keys)
        self._tokens = tuple(tokens)
        self._store = store
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._fetched: list[Fetched] = []  # [0, ready), in key order
        self._done = False
        self._cancelled = False
        self._released = False
        self._running = False  # a driver thread may still append to _fetched
        self._after: object | None = None  # release()'s event, for the driver to honour when it stops

    def progress(self) -> PrefetchProgress:
        with self._lock:
            return PrefetchProgress(len(self._fetched), len(self.keys), self._done)

    def wait(self, timeout: float | None = None) -> PrefetchProgress:
        """Block until done (or ``timeout`` seconds passed); for tools and tests, never the scheduler."""
        with self._changed:
            self._changed.wait_for(lambda: self._done, timeout)
        return self.progress()

    def chunks(self, count: int) -> list[Fetched]:
        """The first ``count`` arrived chunks; valid until the handle is released."""
        with self._lock:
            if self._released or count > len(self._fetched):
                raise ValueError(f"{count} chunks asked for; {len(self._fetched)} arrived"
                                 + (" and the handle is released" if self._released else ""))
            return self._fetched[:count]

    def cancel(self) -> None:
        """Stop reading and drop every pin (once the driver thread has stopped)."""
        self.release()

    def release(self, after: object | None = None) -> None:
        """Drop the pins, after ``after`` (an event or ``TransferHandle``) completes; stops the reading."""
        with self._lock:
            self._cancelled = True
            if self._released:
                return
            self._released = True
            self._after = after
            if self._running:
                return  # the driver drops them when it stops (it sees _cancelled)
            fetched, self._fetched = self._fetched, []
            self._done = True
            self._changed.notify_all()
        self._unpin(fetched, after)

    # ---- driver side --------------------------------------------------------

    def _pin_leading_host_chunks(self) -> None:
        """Pin the leading chunks that are in host memory now, on the calling thread (no I/O)."""
        store = self._store
        for i in range(len(self.keys)):
            entry = store._pin_host(self.keys[i], self._tokens[i], count_hit=True)
            if entry is None:
                return
            self._fetched.append(Fetched(store._host.view(entry), entry, Tier.HOST))

    def _run(self) -> None:
        """Read the remaining chunks in order until done, cancelled, or one fails."""
        try:
            for i in range(len(self._fetched), len(self.keys)):
                if self._is_cancelled():
                    break
                fetched = _fetch_one(self._store, self.keys[i], self._tokens[i])
                if fetched is None or not self._append(fetched):
                    break
        except Exception:  # noqa: BLE001 - a failed read ends the hit, never the engine
            log.exception("prefetch of %d chunk(s) failed; the hit ends at the chunk being read", len(self.keys))
        finally:
            self._finish()

    def _is_cancelled(self) -> bool:
        with self._lock:
            return self._cancelled

    def _append(self, fetched: Fetched) -> bool:
        with self._lock:
            if self._cancelled:
                late = [fetched]
            else:
                self._fetched.append(fetched)
                self._changed.notify_all()
                return True
        self._unpin(late, None)
        return False

    def _finish(self) -> None:
        with self._lock:
            self._running = False
            self._done = True
            dropped = []
            if self._released:
                dropped, self._fetched = self._fetched, []
            self._changed.notify_all()
        self._unpin(dropped, self._after)

    def _unpin(self, fetched: Sequence[Fetched], after: object | None) -> None:
        entries = [f.entry for f in fetched if f.entry is not None]
        if entries:
            self._store._end_loan(entries, after)


def _fetch_one(store: "TieredStore", key: str, tok: bytes | None) -> Fetched | None:
    """One chunk into host memory, pinned; None for a miss, a mismatch or a corrupt chunk."""
    tier = store.contains(key)
    if tier is None:
        return None
    kv = store._get_one(key, tok, None)  # reads, verifies and promotes into the host tier; counts the hit
    if kv is None:
        return None
    entry = store._pin_host(key, tok, count_hit=False)
    if entry is None:
        return Fetched(kv, None, tier)  # no free host slot (all pinned) or no host tier: keep the copy
    return Fetched(store._host.view(entry), entry, tier)


class Prefetcher:
    """Starts prefetches for one store; ``close`` cancels them and waits for the driver threads."""

    def __init__(self, store: "TieredStore", threads: int) -> None:
        self._store = store
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lmcache-sgl-prefetch")
        self._lock = threading.Lock()
        self._live: set[PrefetchHandle] = set()
        self._closed = False

    def start(self, keys: Sequence[str], token_ids_per_key: Sequence["TokenIds"] | None = None) -> PrefetchHandle:
        if token_ids_per_key is not None and len(token_ids_per_key) != len(keys):
            raise ValueError(f"{len(token_ids_per_key)} token id lists for {len(keys)} keys")
        tokens = [token_bytes(t) for t in token_ids_per_key] if token_ids_per_key is not None else [None] * len(keys)
        handle = PrefetchHandle(self._store, keys, tokens)
        with self._lock:
            if self._closed:
                raise RuntimeError("the store is closed; no prefetch can start")
            handle._pin_leading_host_chunks()
            if handle.progress().ready == len(keys):
                handle._finish()  # all in host memory: no thread needed
                return handle
            handle._running = True
            self._live.add(handle)
            self._pool.submit(self._drive, handle)  # under the lock: close() cannot shut the pool meanwhile
        return handle

    def _drive(self, handle: PrefetchHandle) -> None:
        try:
            handle._run()
        finally:
            with self._lock:
                self._live.discard(handle)

    def close(self) -> None:
        """Cancel every running prefetch and wait for the driver threads; idempotent."""
        with self._lock:
            self._closed = True
            live = list(self._live)
        for handle in live:
            handle.cancel()
        self._pool.shutdown(wait=True)
