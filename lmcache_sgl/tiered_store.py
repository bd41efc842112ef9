"""The engine-agnostic tiered chunk store: host RAM, then disk, then remote.

Contract (all methods thread-safe):
  - ``put`` copies a chunk into the host tier (or, without one, queues it for
    the lower tiers) and returns at once; it never waits on disk or network.
    When the host tier is full, its coldest unpinned entries move down
    (write-back): each is copied out, queued for the writer, and its slot
    reused. A put that finds neither a free slot nor room in the write queue
    is dropped and counted; committed data is never discarded for it.
    With ``disk_write_policy: write_through`` (the default) a put into the host
    tier is also queued for the writer at once: the writer drains the queue
    continuously, so the chunk reaches disk within about ``max_pending_writes``
    chunk writes, and the host entry stays (clean once written). A write-through
    that finds the queue full is counted (``write_through_dropped``) and the
    entry stays dirty, so its eviction or a flush still writes it: no data loss.
  - ``lookup`` counts the leading keys present in any tier; it moves no data.
  - ``get`` returns the leading chunks as CPU tensors (private copies), stops at
    the first miss, promotes disk/remote hits into the host tier, and verifies
    every loaded chunk: a corrupt one is quarantined and is a miss.
  - ``flush`` writes everything down (pending writes and dirty host entries), so
    a new process on the same directory finds it, within an optional time limit.
    ``close`` flushes and stops.
  - A failed write loses nothing silently: the chunk stays in memory (a dirty
    host entry, or a pending write) and is retried by the next flush, eviction,
    or put after a back-off, at most ``MAX_WRITE_ATTEMPTS`` times; then it is
    counted in ``writes_abandoned``.
  - ``borrow`` lends host slots; they stay pinned until the loan is released,
    on CUDA not before the transfer reading them has completed.

Index ranges of a prompt of n tokens with chunk size C:
  # [0, k*C)       chunks 0..k-1, the first k keys, looked up and loaded in order
  # [k*C, n)       not stored (a partial tail, unless save_unfull_chunk)
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .config import CacheConfig
from .cost_model import CostModel
from .keys import token_bytes
from .layout import ChunkLayout
from .metrics import Counters, StoreStats, Tier
from .prefetch import PrefetchHandle, Prefetcher
from .read_ahead import IO_THREAD_PREFIX, LowerRead, ReadAhead, on_io_thread
from .storage.chunk_file import CorruptChunk, decode_chunk, max_blob_bytes
from .storage.disk_tier import DiskTier
from .storage.host_tier import HostEntry, HostTier, Loan
from .storage.remote_tier import RemoteTier
from .store_writes import FlushReport, WritePath
from .write_back import PendingWrite, RetryQueue, WriteBack

log = logging.getLogger(__name__)

TokenIds = Sequence[int] | np.ndarray

__all__ = ["Tier", "Loan", "LookupResult", "PinCounts", "FlushReport", "TieredStore"]


def _copy_out(src: torch.Tensor, dst: torch.Tensor | None) -> torch.Tensor:
    """A private copy of ``src``: a clone, or the leading tokens of ``dst`` filled with it."""
    if dst is None:
        return src.clone()
    num_tokens = src.shape[2]  # [L, P, T, H, D]
    if dst.dim() != 5 or dst.shape[:2] != src.shape[:2] or dst.shape[3:] != src.shape[3:] \
            or dst.shape[2] < num_tokens or dst.dtype != src.dtype:
        raise ValueError(f"out buffer {tuple(dst.shape)} {dst.dtype} cannot hold chunk {tuple(src.shape)} {src.dtype}")
    view = dst[:, :, :num_tokens]
    view.copy_(src)
    return view


class LookupResult(NamedTuple):
    num_hits: int  # leading keys found
    tiers: tuple[Tier, ...]  # the tier of each hit, fastest first


class PinCounts(NamedTuple):
    chunks: int  # leading chunks pinned now (including ones pinned before)
    host: int  # of those, pinned in the host tier
    disk: int  # ... and on disk (a chunk may be in both)


class _Pin(NamedTuple):
    entry: HostEntry | None  # holds one ref for the pin, or None: not in the host tier when pinned
    on_disk: bool




class TieredStore(WritePath):
    def __init__(self, config: CacheConfig, layout: ChunkLayout) -> None:
        if layout.chunk_size != config.chunk_size:
            raise ValueError(f"layout chunk_size={layout.chunk_size} differs from config chunk_size={config.chunk_size}")
        self.config = config
        self.layout = layout
        self._fingerprint = layout.fingerprint.to_dict()
        self._lock = threading.Lock()
        self._counters = Counters()
        self.cost = CostModel(config.load_policy)
        self._pending: dict[str, PendingWrite] = {}  # queued for write-back, still servable
        self._retry = RetryQueue(config.max_pending_writes)  # failed, not queued; a subset of _pending
        # Write-through jobs in the writer's queue whose chunk is still a (dirty) host entry.
        # Invariant: _through[k] is queued and k is in the host tier; eviction moves it to _pending.
        self._through: dict[str, PendingWrite] = {}
        self._pins: dict[str, _Pin] = {}  # control-API pins, this process only; guarded by _pin_lock
        self._pin_lock = threading.Lock()  # taken before _lock
        self._pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix=IO_THREAD_PREFIX)
        self._prefetcher = Prefetcher(self, config.io_threads)
        self._host = HostTier(config.host_bytes, layout.chunk_bytes, config.cache_policy) \
            if config.host_bytes >= layout.chunk_bytes else None
        self._disk = self._open_disk(config)
        self._remote = RemoteTier(config.remote_url, config.remote_timeout_ms / 1000,
                                  config.remote_backoff_max_s, config.remote_ttl_s) if config.remote_url else None
        sinks = [s for s in (self._disk, self._remote) if s is not None]
        self._writer = WriteBack(sinks, self._fingerprint, config.disk_codec, config.byte_shuffle,
                                 config.max_pending_writes, config.io_threads, config.write_nice,
                                 self._write_done) if sinks else None
        self._write_through = (config.disk_write_policy == "write_through" and self._writer is not None
                               and self._host is not None)  # without a host tier every put is queued anyway

    @staticmethod
    def _open_disk(config: CacheConfig) -> DiskTier | None:
        if not config.local_disk:
            return None
        try:
            return DiskTier(config.local_disk, config.disk_bytes, config.cache_policy,
                            rescan_interval_s=config.disk_rescan_interval_s, shared_group=config.shared_dir_group)
        except OSError as e:  # unreadable or unwritable directory: serve without it
            log.error("disk tier disabled: cannot use local_disk=%r: %s", config.local_disk, e)
            return None

    # ---- put ---------------------------------------------------------------

    def put(self, key: str, token_ids: TokenIds, kv: torch.Tensor, start_pos: int = 0, *,
            presence_checked: bool = False) -> bool:
        """Store one chunk ``kv`` [L, P, T, H, D] for ``token_ids`` (T of them). False if dropped.

        A chunk any tier already holds is not stored again. ``presence_checked``: the
        caller just asked ``missing()`` for this key, so only the local tiers are
        checked again (no second remote round trip per chunk).
        """
        tok = token_bytes(token_ids)
        self._check_chunk(kv, len(tok) // 4)
        held = self._local_tier(key) if presence_checked else self.contains(key)
        if held is not None:
            return True
        # Write-through hands this tensor to the writer: it must be a private copy.
        kv = kv.detach().to("cpu", copy=self._write_through)
        with self._lock:
            if key in self._pending or (self._host is not None and key in self._host):
                return True
            stored = self._put_locked(key, tok, kv, start_pos)
            if stored:
                self._counters.put_chunks += 1
            else:
                self._counters.puts_dropped += 1
            self._resubmit_retries_locked()  # after the put, so retries never take its queue slot
            return stored

    def _put_locked(self, key: str, tok: bytes, kv: torch.Tensor, start_pos: int) -> bool:
        if self._host is None:
            return self._queue_locked(PendingWrite(key, kv.clone(), tok, start_pos))
        if not self._make_room_locked():
            return False
        self._host.insert(key, kv, tok, start_pos, dirty=self._writer is not None)
        if self._write_through:
            self._write_through_locked(PendingWrite(key, kv, tok, start_pos))
        return True

    def _check_chunk(self, kv: torch.Tensor, num_tokens: int) -> None:
        if not 1 <= num_tokens <= self.layout.chunk_size:
            raise ValueError(f"a chunk holds 1..{self.layout.chunk_size} tokens, got {num_tokens}")
        expected = self.layout.shape(num_tokens)
        if tuple(kv.shape) != expected or kv.dtype != self.layout.dtype:
            raise ValueError(f"chunk tensor is {tuple(kv.shape)} {kv.dtype}; "
                             f"expected {expected} {self.layout.dtype}")

    # ---- lookup / get ------------------------------------------------------

    def contains(self, key: str) -> Tier | None:
        return self._tiers_of([key])[0]

    def missing(self, keys: Sequence[str]) -> list[int]:
        """Indices of the keys no tier holds, with at most one remote round trip for them all."""
        absent = [i for i, key in enumerate(keys) if self._local_tier(key) is None]
        if absent and self._remote is not None:
            remote = self._remote.contains_many([keys[i] for i in absent])
            absent = [i for i, there in zip(absent, remote) if not there]
        return absent

    def _local_tier(self, key: str) -> Tier | None:
        if self._in_host(key):
            return Tier.HOST
        if self._disk is not None and self._disk.contains(key):
            return Tier.DISK
        return None

    def _tiers_of(self, keys: Sequence[str]) -> list[Tier | None]:
        """The tier of each key, up to and including the first miss; at most one remote round trip."""
        tiers: list[Tier | None] = []
        remote: list[bool] | None = None  # for keys[first local miss:], asked once
        for i, key in enumerate(keys):
            tier = self._local_tier(key)
            if tier is None and self._remote is not None:
                if remote is None:
                    remote = [False] * i + self._remote.contains_many(keys[i:])
                tier = Tier.REMOTE if remote[i] else None
            tiers.append(tier)
            if tier is None:
                break
        return tiers

    def lookup(self, keys: Sequence[str]) -> LookupResult:
        """Leading keys present and worth loading (``load_policy``), with their tiers."""
        tiers, cut = [], False
        for tier in self._tiers_of(keys):
            if tier is None:
                break
            if not self.cost.worth_loading(tier, self.layout.chunk_bytes, self.layout.chunk_size):
                cut = True
                break
            tiers.append(tier)
        with self._lock:
            self._counters.lookups += 1
            self._counters.cut_by_cost += cut
        return LookupResult(len(tiers), tuple(tiers))

    def record_prefill(self, tokens: int, seconds: float) -> None:
        """The engine reports a prefill it ran; feeds the load-or-recompute decision."""
        self.cost.record_prefill(tokens, seconds)

    def get(self, keys: Sequence[str], token_ids_per_key: Sequence[TokenIds] | None = None,
            out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The leading chunks found, as CPU tensors [L, P, T, H, D]; stops at the first miss.

        With ``token_ids_per_key``, a chunk whose stored token ids differ is a miss
        (a guard against key collisions). With ``out`` (one tensor per key, e.g.
        pinned staging buffers), chunk i is copied into ``out[i]`` (its leading T
        tokens for a partial chunk) and that view is returned: one copy from the
        host slot, no temporary. Without it, each chunk is a private copy.
        Disk and remote chunks are read and decoded ahead on the I/O pool
        (``read_ahead.py``), ``io_threads`` at a time.
        """
        if out is not None and len(out) < len(keys):
            raise ValueError(f"out has {len(out)} buffers for {len(keys)} keys")
        toks = self._token_bytes(keys, token_ids_per_key)
        result = []
        with self._read_ahead(keys, toks) as reads:
            for i, key in enumerate(keys):
                kv = self._get_one(key, toks[i], out[i] if out is not None else None, reads, i)
                if kv is None:
                    with self._lock:
                        self._counters.miss_chunks += 1
                    break
                result.append(kv)
        return result

    @staticmethod
    def _token_bytes(keys: Sequence[str], token_ids_per_key: Sequence[TokenIds] | None) -> list[bytes | None]:
        if token_ids_per_key is None:
            return [None] * len(keys)
        if len(token_ids_per_key) < len(keys):
            raise ValueError(f"{len(token_ids_per_key)} token id lists for {len(keys)} keys; one per key is required")
        return [token_bytes(token_ids_per_key[i]) for i in range(len(keys))]

    def _read_ahead(self, keys: Sequence[str], toks: Sequence[bytes | None]) -> ReadAhead:
        """The lower-tier reads of ``keys``; inline only on an I/O pool thread (no waiting on its own pool)."""
        pool = None if on_io_thread() else self._pool
        return ReadAhead(lambda i, decode_pool: self._read_lower(keys[i], toks[i], decode_pool),
                         lambda i: self._in_host(keys[i]), len(keys), pool,
                         self.config.io_threads, self.cost)

    def _in_host(self, key: str) -> bool:
        with self._lock:
            return key in self._pending or (self._host is not None and key in self._host)

    def _get_one(self, key: str, tok: bytes | None, dst: torch.Tensor | None,
                 reads: ReadAhead | None = None, index: int = 0) -> torch.Tensor | None:
        """Chunk ``key`` from host memory, else key ``index`` of ``reads`` (or a read of its own)."""
        with self._lock:
            found = self._get_host_locked(key)
            if found is not None:
                stored_tok, view = found
                if tok is not None and stored_tok != tok:
                    log.warning("chunk %s: token ids differ from the request's; treated as a miss", key)
                    return None
                self._counters.hit_chunks[Tier.HOST.value] += 1
                return _copy_out(view, dst)
        if reads is not None:
            return self._load_lower(key, reads, index, dst)
        with self._read_ahead([key], [tok]) as own:
            return self._load_lower(key, own, 0, dst)

    def _get_host_locked(self, key: str) -> tuple[bytes, torch.Tensor] | None:
        """(token ids, a view of the stored chunk); copy it out before releasing the lock."""
        job = self._pending.get(key)
        if job is not None:
            return job.token_ids, job.kv
        entry = self._host.entry(key) if self._host is not None else None
        if entry is None:
            return None
        self._host.touch(key)
        return entry.token_ids, self._host.view(entry)

    def _load_lower(self, key: str, reads: ReadAhead, index: int, dst: torch.Tensor | None) -> torch.Tensor | None:
        """Key ``index`` of ``reads``, in key order: quarantines refused copies; counts, promotes, copies out a hit."""
        read = reads.result(index)
        for tier, reason in read.corrupt:
            self._drop_corrupt(key, tier, reason)
        if read.kv is None:
            return None
        reads.accepted(read)
        with self._lock:
            self._counters.hit_chunks[read.tier.value] += 1
            if self._host is not None and key not in self._host and self._make_room_locked():
                self._host.insert(key, read.kv, read.header.token_ids, read.header.start_pos, dirty=False)
        return read.kv if dst is None else _copy_out(read.kv, dst)

    def _read_lower(self, key: str, tok: bytes | None, pool: ThreadPoolExecutor | None) -> LowerRead:
        """Read and verify ``key`` from disk, then remote, decoding blocks on ``pool``; changes no state."""
        raw_cap = self.layout.chunk_bytes  # a planted file may claim more; it is refused before decoding
        corrupt = []
        for tier, backend in ((Tier.DISK, self._disk), (Tier.REMOTE, self._remote)):
            if backend is None:
                continue
            try:
                blob = backend.read(key, max_bytes=max_blob_bytes(raw_cap))
                if blob is None:
                    continue
                header, kv = decode_chunk(blob, key=key, token_ids=tok, fingerprint=self._fingerprint, pool=pool,
                                          max_raw_len=raw_cap)
                self._check_chunk(kv, header.num_tokens)
                return LowerRead(tier, header, kv, tuple(corrupt))
            except (CorruptChunk, ValueError) as e:
                corrupt.append((tier, str(e)))
        return LowerRead(None, None, None, tuple(corrupt))

    def _drop_corrupt(self, key: str, tier: Tier, reason: str) -> None:
        with self._lock:
            self._counters.corrupt_chunks += 1
        if tier is Tier.DISK:
            self._disk.quarantine(key, reason)
        else:
            log.warning("remote chunk %s is corrupt (%s); removing it", key, reason)
            self._remote.remove(key)

    def prefetch(self, keys: Sequence[str],
                 token_ids_per_key: Sequence[TokenIds] | None = None) -> PrefetchHandle:
        """Start reading the leading chunks into pinned host slots on background threads (``prefetch.py``)."""
        return self._prefetcher.start(keys, token_ids_per_key)

    @contextmanager
    def borrow(self, keys: Sequence[str], token_ids_per_key: Sequence[TokenIds] | None = None):
        """Yield a ``Loan`` of the leading chunks: views of their host slots, not copies.

        The entries stay pinned (never evicted or overwritten) until the loan is
        released. Call ``loan.release(after=handle)`` with the event or
        ``TransferHandle`` of the copies reading the views: the pins drop when
        it completes. Without it, the block's exit releases the loan: at once on
        CPU; on CUDA (pinned slots, read zero-copy by the scatter kernel) after
        the work queued so far on the current stream. Disk and remote hits are
        promoted into the host tier first. A chunk that cannot get a host slot
        (all pinned, or no host tier) is lent as a private copy instead.
        """
        views: list[torch.Tensor] = []
        entries: list[HostEntry] = []
        loan = Loan(views, lambda after: self._end_loan(entries, after))
        toks = self._token_bytes(keys, token_ids_per_key)
        try:
            with self._read_ahead(keys, toks) as reads:
                for i, key in enumerate(keys):
                    view = self._lend_one(key, toks[i], entries, reads, i)
                    if view is None:
                        break
                    views.append(view)
            yield loan
        finally:
            if not loan.released:
                loan.release(after=self._stream_event())

    def _lend_one(self, key: str, tok: bytes | None, entries: list[HostEntry], reads: ReadAhead,
                  index: int) -> torch.Tensor | None:
        """A pinned view of the chunk's host slot (its entry appended to ``entries``), a copy, or None."""
        entry = self._pin_host(key, tok, count_hit=True)
        if entry is None:
            loaded = self._get_one(key, tok, None, reads, index)  # counts the hit; promotes when it can
            if loaded is None:
                return None
            entry = self._pin_host(key, tok, count_hit=False)
            if entry is None:
                return loaded  # no host slot for it: a private copy
        entries.append(entry)
        return self._host.view(entry)  # safe outside the lock: the entry is pinned

    def _pin_host(self, key: str, tok: bytes | None, count_hit: bool) -> HostEntry | None:
        with self._lock:
            entry = self._host.entry(key) if self._host is not None else None
            if entry is None or (tok is not None and entry.token_ids != tok):
                return None
            entry.refs += 1
            self._host.touch(key)
            self._counters.hit_chunks[Tier.HOST.value] += count_hit
            return entry

    def _stream_event(self) -> torch.cuda.Event | None:
        """On pinned (CUDA) slots, an event after the work queued so far on the current stream."""
        if self._host is None or not self._host.pinned:
            return None
        return torch.cuda.current_stream().record_event()

    def _end_loan(self, entries: list[HostEntry], after: object | None) -> None:
        with self._lock:
            if self._host is not None:
                self._host.unpin_after(entries, after)

    # ---- pinning, removal, lifecycle --------------------------------------

    def pin(self, keys: Sequence[str]) -> int:
        """Protect host entries from eviction; returns how many were pinned."""
        with self._lock:
            entries = [self._host.entry(k) for k in keys] if self._host is not None else []
            pinned = [e for e in entries if e is not None]
            for e in pinned:
                e.refs += 1
            return len(pinned)

    def unpin(self, keys: Sequence[str]) -> None:
        with self._lock:
            for k in keys:
                e = self._host.entry(k) if self._host is not None else None
                if e is not None and e.refs > 0:
                    e.refs -= 1

    def locate(self, keys: Sequence[str]) -> tuple[Tier, ...]:
        """The tier of each leading key held anywhere: no cost cut, no counters (the control API's lookup)."""
        tiers = self._tiers_of(keys)
        return tuple(t for t in tiers if t is not None)  # only the last can be None

    def pin_chunks(self, keys: Sequence[str], token_ids_per_key: Sequence[TokenIds] | None = None) -> PinCounts:
        """Pin the leading chunks held in the host tier or on disk: neither evicts them until ``unpin_chunks``.

        Pending writes are drained first, so a written-through chunk is pinned on disk
        too. Stops at the first chunk neither holds (a remote-only chunk cannot be
        pinned: Redis evicts by its own policy). Pinning a pinned key changes nothing.
        Pins live in this process's memory; a restart forgets them.
        """
        self.flush_pending()
        pins: list[_Pin] = []
        with self._pin_lock:
            for i, key in enumerate(keys):
                pin = self._pins.get(key)
                if pin is None:
                    tok = token_bytes(token_ids_per_key[i]) if token_ids_per_key is not None else None
                    on_disk = self._disk is not None and self._disk.pin(key)
                    pin = _Pin(self._pin_host(key, tok, count_hit=False), on_disk)
                    if pin.entry is None and not pin.on_disk:
                        break
                    self._pins[key] = pin
                pins.append(pin)
        return PinCounts(len(pins), sum(p.entry is not None for p in pins), sum(p.on_disk for p in pins))

    def unpin_chunks(self, keys: Sequence[str]) -> int:
        """Drop the control-API pins of ``keys``; returns how many were pinned."""
        with self._pin_lock:
            pins = [p for p in (self._pins.pop(k, None) for k in keys) if p is not None]
            with self._lock:
                for pin in pins:
                    if pin.entry is not None:
                        pin.entry.refs -= 1
        if self._disk is not None:
            for key in keys:
                self._disk.unpin(key)
        return len(pins)

    def pinned_keys(self) -> set[str]:
        with self._pin_lock:
            return set(self._pins)

    @property
    def disk(self) -> DiskTier | None:
        return self._disk

    @property
    def remote(self) -> RemoteTier | None:
        return self._remote

    def remove(self, key: str) -> None:
        """Remove a chunk from every tier (a pinned host copy stays until unpinned)."""
        self.flush_pending()
        with self._lock:
            self._pending.pop(key, None)
            self._through.pop(key, None)
            self._retry.pop(key)
            if self._host is not None:
                self._host.reap()
                self._host.remove(key)
        for backend in (self._disk, self._remote):
            if backend is not None:
                backend.remove(key)

    def clear(self, tiers: Sequence[Tier] = tuple(Tier)) -> None:
        """Empty ``tiers`` (default all); pinned chunks (loans, control-API pins) stay in host and disk."""
        self.flush_pending()
        if Tier.HOST in tiers:
            with self._lock:
                self._pending.clear()
                self._through.clear()
                self._retry.clear()
                if self._host is not None:
                    self._host.reap()
                    for key in self._host.keys():
                        self._host.remove(key)
        for tier, backend in ((Tier.DISK, self._disk), (Tier.REMOTE, self._remote)):
            if backend is not None and tier in tiers:
                backend.clear()

    def close(self, timeout_s: float | None = None) -> None:
        """Flush (within ``timeout_s``, if given) and stop; what is still unwritten then is lost and logged."""
        self._prefetcher.close()  # first: its threads read tiers that close shuts down
        flushed = self.flush(timeout_s)
        with self._lock:
            if self._host is not None:
                self._host.wait_for_loans()  # no transfer may read the slots once they are freed
                unwritten = sum(self._host.entry(k).dirty for k in self._host.keys())
            else:
                unwritten = 0
            unwritten += len(self._retry)
            if flushed.timed_out:
                unwritten = flushed.unwritten  # the flush thread and the writer still run: don't wait for them
            if unwritten:
                self._counters.writes_abandoned += unwritten
                log.error("closing with %d chunks that could not be written down; they are lost", unwritten)
        if self._writer is not None and not flushed.timed_out:
            self._writer.close()
        if self._remote is not None:
            self._remote.close()
        self._pool.shutdown(wait=not flushed.timed_out)

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> StoreStats:
        with self._lock:
            c, host, disk, remote = self._counters, self._host, self._disk, self._remote
            return StoreStats(
                lookups=c.lookups, hit_chunks=dict(c.hit_chunks), miss_chunks=c.miss_chunks,
                put_chunks=c.put_chunks, puts_dropped=c.puts_dropped, host_evictions=c.host_evictions,
                writebacks=c.writebacks, write_failures=c.write_failures, writes_abandoned=c.writes_abandoned,
                raw_bytes_written=c.raw_bytes_written,
                encoded_bytes_written=c.encoded_bytes_written, corrupt_chunks=c.corrupt_chunks,
                cut_by_cost=c.cut_by_cost,
                host_entries=len(host) if host is not None else 0,
                host_bytes=host.used_bytes if host is not None else 0,
                host_capacity_bytes=host.capacity_bytes if host is not None else 0,
                disk_entries=len(disk) if disk is not None else 0,
                disk_bytes=disk.used_bytes if disk is not None else 0,
                disk_evictions=disk.evictions if disk is not None else 0,
                disk_quarantined=disk.quarantined if disk is not None else 0,
                disk_write_errors=disk.write_errors if disk is not None else 0,
                remote_errors=remote.errors if remote is not None else 0,
                remote_breaker_trips=remote.breaker_trips if remote is not None else 0,
                pending_writes=len(self._pending) + len(self._through),
                write_through_dropped=c.write_through_dropped)
