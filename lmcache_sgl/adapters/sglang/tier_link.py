"""The store side of the SGLang radix extension: which chunks to save, plan and load.

Nothing here touches the radix tree; ``radix_cache.TieredRadixCache`` hands in
token ids and device slots. Index ranges of one token path, chunk size C:

    # [0, n_full*C)               full chunks, keyed by prefix_keys(fp, tokens, C)
    # [i*C, (i+1)*C)              chunk i; saved when the node holding its last token leaves the device
    # [device_len, hit_end)       a load: beyond the device match, up to the last leading store hit
    #                             that every TP rank has (``RankAgreement``)

Every failure here (a corrupt chunk, an unreadable file, a full disk) is
logged and becomes a miss: a save that fails is dropped, a load that fails
loads nothing, and the request is prefilled as if the store were empty.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from ...keys import ModelFingerprint, prefix_keys
from ...metrics import Tier
from ...prefetch import PrefetchHandle
from ...tiered_store import TieredStore
from .device_kv import DeviceKV
from .tp_agree import RankAgreement

log = logging.getLogger(__name__)

# save_policy -> the hit count at which an inserted chunk is copied into the store (None: only on eviction).
SAVE_THRESHOLDS = {"write_through": 1, "write_through_selective": 2, "write_back": None}
MAX_COUNTED_CHUNKS = 1 << 17  # hit counts kept, least recently inserted dropped first


class LoadPlan(NamedTuple):
    """Store hits that extend a device match of ``device_len`` tokens to ``hit_end``."""

    tokens: np.ndarray  # int64 token ids [0, hit_end)
    keys: tuple[str, ...]  # keys of chunks first_chunk .. hit_end // C - 1
    first_chunk: int  # the chunk holding token device_len
    device_len: int
    hit_end: int


class Loaded(NamedTuple):
    kv: torch.Tensor  # host [L, 2, hit_end - device_len, H, D]
    host_tokens: int  # of those tokens, how many came from the host tier
    disk_tokens: int  # ... and from disk (or remote)


class Prefetch:
    """A queued request's prefetch: the plan it reads (from chunk ``plan.first_chunk``) and its handle.

    ``handle`` is None when the prefetch could not start: nothing arrives, it is done.
    """

    __slots__ = ("plan", "handle", "first_poll", "gate_open")

    def __init__(self, plan: LoadPlan, handle: PrefetchHandle | None) -> None:
        self.plan = plan
        self.handle = handle
        self.first_poll: float | None = None  # monotonic time of the first admission attempt
        self.gate_open = False  # the admission gate let the request through; its next match is the admission's

    def arrived(self) -> int:
        """Leading planned chunks in host memory now."""
        return self.handle.progress().ready if self.handle is not None else 0

    def done(self) -> bool:
        return self.handle is None or self.handle.progress().done

    def close(self) -> None:
        if self.handle is not None:
            self.handle.release()


@dataclass
class LinkCounters:
    """Token counts since start, by where the KV came from or went."""

    saved_chunks: int = 0
    save_failures: int = 0
    loads: int = 0
    load_failures: int = 0
    tokens: dict = field(default_factory=lambda: {"host": 0, "disk": 0})


class TierLink:
    """Moves whole chunks between SGLang's device pool and a ``TieredStore``."""

    def __init__(self, store: TieredStore, device_kv: DeviceKV, fingerprint: ModelFingerprint,
                 agree: RankAgreement | None = None) -> None:
        self.store = store
        self.agree = agree or RankAgreement()
        self.device_kv = device_kv
        self.fingerprint = fingerprint
        self.chunk_size = store.config.chunk_size
        self.counters = LinkCounters()
        self._lock = threading.Lock()
        self._hits: OrderedDict[str, int] = OrderedDict()  # chunk key -> inserts that covered it, LRU first

    # ---- save (device -> store) -------------------------------------------

    def save_completed_chunks(self, tokens: np.ndarray, slots: torch.Tensor, node_start: int) -> int:
        """Store the full chunks whose last token lies in [node_start, len(tokens)).

        ``slots`` [len(tokens)] are the device slots of the whole path from the
        root; the path is still on the device. Returns how many chunks were put.
        """
        c = self.chunk_size
        return self.save_chunks(tokens, slots, range(node_start // c, len(tokens) // c))

    def save_chunks(self, tokens: np.ndarray, slots: torch.Tensor, chunks: Sequence[int],
                    still_valid: Callable[[], bool] | None = None) -> int:
        """Store the full chunks ``chunks`` (indices, ascending) of a device path; how many were put.

        ``slots`` [>= (chunks[-1] + 1) * C] are the path's device slots from the
        root, which must stay on the device (locked or not evictable) until the
        copy ends; nothing is put if ``still_valid()`` is False after the copy.
        """
        c = self.chunk_size
        if not chunks:
            return 0
        try:
            keys = prefix_keys(self.fingerprint, tokens[:(chunks[-1] + 1) * c], c)
            todo = [chunks[i] for i in self.store.missing([keys[i] for i in chunks])]
            if not todo:
                return 0
            index = torch.cat([torch.arange(i * c, (i + 1) * c) for i in todo])
            kv = self.device_kv.gather(slots[index.to(slots.device)])  # [L, 2, len(todo)*C, H, D]
            if still_valid is not None and not still_valid():
                return 0  # the slots were released while we copied: the KV may be torn
            put = 0
            for j, i in enumerate(todo):
                put += self.store.put(keys[i], tokens[i * c:(i + 1) * c], kv[:, :, j * c:(j + 1) * c],
                                      start_pos=i * c, presence_checked=True)
        except Exception:  # noqa: BLE001 - engine boundary: a failed save is a dropped save
            log.exception("lmcache_sgl: saving %d chunk(s) failed; they are dropped", len(chunks))
            with self._lock:
                self.counters.save_failures += 1
            return 0
        with self._lock:
            self.counters.saved_chunks += put
        return put

    def backup_chunks(self, tokens: np.ndarray, inserted_len: int) -> tuple[int, ...]:
        """Chunks of an inserted path that ``save_policy`` saves now (indices, ascending).

        An insert counts one hit for each full chunk it newly covers, those
        ending after ``inserted_len`` (the same request's earlier inserts
        counted the rest). A chunk is due when its count reaches the policy's
        threshold: 1 for write_through, 2 for write_through_selective; never
        for write_back. Counts depend on the token ids alone: equal on every TP rank.
        """
        threshold = SAVE_THRESHOLDS[self.store.config.save_policy]
        c = self.chunk_size
        first, n_full = inserted_len // c, len(tokens) // c
        if threshold is None or first >= n_full:
            return ()
        keys = prefix_keys(self.fingerprint, tokens[:n_full * c], c)
        due = []
        with self._lock:
            for i in range(first, n_full):
                count = self._hits.pop(keys[i], 0) + 1
                self._hits[keys[i]] = count  # most recent last
                if count == threshold:
                    due.append(i)
            while len(self._hits) > MAX_COUNTED_CHUNKS:
                self._hits.popitem(last=False)
        return tuple(due)

    # ---- plan (a cheap lookup, no data moved) -------------------------------

    def plan(self, tokens: np.ndarray, device_len: int) -> LoadPlan | None:
        """The store hits beyond a device match of ``device_len`` tokens that every TP rank has, or None.

        A collective under TP whenever ``tokens`` hold a full chunk: the call
        depends on the token ids alone, which every rank shares.
        """
        c = self.chunk_size
        n_full = len(tokens) // c
        if n_full == 0:
            return None
        keys = prefix_keys(self.fingerprint, tokens[:n_full * c], c)
        first = device_len // c
        hit_end = self.agree.min(self._local_hit_end(keys, first))  # [0, hit_end) chunk-aligned
        if hit_end <= device_len:
            return None
        return LoadPlan(tokens[:hit_end], tuple(keys[first:hit_end // c]), first, device_len, hit_end)

    def _local_hit_end(self, keys: Sequence[str], first: int) -> int:
        """The end of this rank's leading store hits from chunk ``first``; 0 for none (a failed lookup too)."""
        if first >= len(keys):
            return 0
        try:
            hits = self.store.lookup(keys[first:]).num_hits
        except Exception:  # noqa: BLE001
            log.exception("lmcache_sgl: store lookup failed; treated as a miss")
            return 0
        return (first + hits) * self.chunk_size if hits else 0

    # ---- prefetch (store -> host slots, off the scheduler thread) -----------

    def start_prefetch(self, plan: LoadPlan) -> Prefetch:
        """Start reading the plan's chunks into host memory; a failed start is a prefetch that brings nothing."""
        c = self.chunk_size
        spans = [plan.tokens[i * c:(i + 1) * c] for i in range(plan.first_chunk, plan.hit_end // c)]
        try:
            return Prefetch(plan, self.store.prefetch(plan.keys, spans))
        except Exception:  # noqa: BLE001 - engine boundary: a failed prefetch is a miss
            log.exception("lmcache_sgl: starting a prefetch of %d chunk(s) failed; treated as a miss", len(plan.keys))
            return Prefetch(plan, None)

    def admit(self, prefetch: Prefetch, engine_busy: bool) -> bool:
        """Whether the request may be admitted now (``prefetch_policy``); a collective under TP.

        Every rank admits together: all ranks' prefetches done, or (best_effort) the
        engine has other work, or (timeout) any rank's wait ran out.
        """
        policy = self.store.config.prefetch_policy
        now = time.monotonic()
        if prefetch.first_poll is None:
            prefetch.first_poll = now
        if self.agree.min(int(prefetch.done())):
            return True
        if policy == "best_effort":
            return engine_busy  # equal on every rank: the running batch is
        if policy == "timeout":
            expired = now - prefetch.first_poll >= self.store.config.prefetch_timeout_ms / 1000
            return self.agree.min(int(not expired)) == 0  # MAX of expired: any rank timed out
        return False

    def load_prefetched(self, plan: LoadPlan, prefetch: Prefetch) -> Loaded | None:
        """The plan's KV from chunks the prefetch holds in host memory: no I/O. None (a logged miss) on failure."""
        c = self.chunk_size
        count = plan.hit_end // c - plan.first_chunk
        try:
            fetched = prefetch.handle.chunks(count)
            skip = plan.device_len - plan.first_chunk * c  # tokens of the first chunk already on the device
            # [L, 2, hit_end - device_len, H, D]
            kv = torch.cat([f.kv for f in fetched], dim=2)[:, :, skip:].contiguous()
        except Exception:  # noqa: BLE001
            log.exception("lmcache_sgl: %d prefetched chunk(s) could not be used; prefilling instead", count)
            with self._lock:
                self.counters.load_failures += 1
            return None
        spans = [(i * c, (i + 1) * c) for i in range(plan.first_chunk, plan.hit_end // c)]
        host, disk = _split_by_tier(spans, [f.tier for f in fetched], plan.device_len)
        with self._lock:
            self.counters.loads += 1
            self.counters.tokens["host"] += host
            self.counters.tokens["disk"] += disk
        return Loaded(kv, host, disk)

    # ---- load (store -> host tensor) ---------------------------------------

    def load(self, plan: LoadPlan) -> Loaded | None:
        """Read the planned chunks; None (a logged miss) unless every one is read intact."""
        c = self.chunk_size
        spans = [(i * c, (i + 1) * c) for i in range(plan.first_chunk, plan.hit_end // c)]
        try:
            tiers = self.store.lookup(plan.keys).tiers  # before get() promotes disk hits to host
            chunks = self.store.get(plan.keys, [plan.tokens[s:e] for s, e in spans])
        except Exception:  # noqa: BLE001
            log.exception("lmcache_sgl: loading %d chunk(s) failed; treated as a miss", len(plan.keys))
            chunks, tiers = [], ()
        if len(chunks) < len(plan.keys) or len(tiers) < len(plan.keys):
            log.warning("lmcache_sgl: %d of %d planned chunk(s) could not be read; prefilling instead",
                        len(plan.keys) - min(len(chunks), len(tiers)), len(plan.keys))
            with self._lock:
                self.counters.load_failures += 1
            return None
        skip = plan.device_len - plan.first_chunk * c  # tokens of the first chunk already on the device
        kv = torch.cat(chunks, dim=2)[:, :, skip:].contiguous()  # [L, 2, hit_end - device_len, H, D]
        host, disk = _split_by_tier(spans, tiers, plan.device_len)
        with self._lock:
            self.counters.loads += 1
            self.counters.tokens["host"] += host
            self.counters.tokens["disk"] += disk
        return Loaded(kv, host, disk)


def _split_by_tier(spans: Sequence[tuple[int, int]], tiers: Sequence[Tier], device_len: int) -> tuple[int, int]:
    """Loaded tokens (those at or after ``device_len``) that came from the host tier, and from below it."""
    host = disk = 0
    for (start, end), tier in zip(spans, tiers):
        n = end - max(start, device_len)
        if tier == Tier.HOST:
            host += n
        else:
            disk += n
    return host, disk


def token_array(token_ids) -> np.ndarray:
    """Token ids (array('q'), list, tensor) as an int64 numpy array."""
    if isinstance(token_ids, torch.Tensor):
        return token_ids.cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(token_ids, dtype=np.int64)
