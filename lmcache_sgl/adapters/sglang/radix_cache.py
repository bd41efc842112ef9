"""SGLang's UnifiedRadixCache extended with our host and disk tiers.

Protocol with the scheduler (sglang 0.5.23, the HiCache load-back path):

1. ``match_prefix`` runs SGLang's device match, then looks up the chunks
   that follow it and starts (once per request) a prefetch: the store's
   threads read disk and Redis hits into pinned host slots while the request
   waits in the queue (the scheduler matches when it queues a request, since
   the plugin turns on its prefetch path). Only chunks already in host memory
   are reported, as ``host_hit_length`` (tokens beyond the device match), so
   admission budgets for them and the scheduler thread never reads a file.
2. ``check_prefetch_progress`` gates admission by ``prefetch_policy``
   (``TierLink.admit``). On admission the scheduler calls ``init_load_back``:
   the prefetched chunks are scattered into newly allocated device slots and
   inserted into the tree, so the tree owns them at once, and the prefetch's
   pins are dropped. It returns ``(loaded tokens, new last node)``;
   all promised tokens or none (a failed load is a logged miss and the
   request is prefilled). The scheduler raises on a partial commit
   (``schedule_policy.py``: "must commit all promised FULL tokens or none").
3. ``insert`` (after a prefill, at a request's end) counts a hit on each
   full chunk it newly covers; at ``save_policy``'s threshold (write_through:
   the first, write_through_selective: the second) the path is locked and a
   worker copies the chunks into the store (``backups.BackupQueue``). The lock
   is dropped in ``check_hicache_events`` (each step) once every TP rank's copy
   is done, so an eviction never frees slots a copy still reads.
4. ``_evict_device_leaf`` (allocator-driven eviction) first puts the full
   chunks that the leaf completes and the store lacks. A chunk may span several
   nodes; its earlier tokens sit in ancestors, which are still on the device
   because eviction takes leaves first.

On CUDA, a load-back's copies run per layer on a side stream and the forward
of layer i waits only for layer i (``layer_load``); on CPU they finish in
``init_load_back``.

The tier split of a request's cached tokens goes to ``req.storage_hit_*``,
which SGLang turns into ``meta_info.cached_tokens_details``
(device / host / storage = our disk tier).

Tensor parallelism: each rank consults its own store, so both decisions taken
from it are agreed with a MIN over the TP CPU group (``tp_agree``), as
HiCache does: the hit length in ``match_prefix`` (inside ``TierLink.plan``),
the prefetched length there too, the admission verdict, and the load's
success in ``init_load_back``. If any rank could not stage the
whole load, every rank frees its staged slots and prefills.

Namespaced requests (LoRA ``extra_key``, ``cache_salt``) and EAGLE bigram keys
bypass the store: their KV is not a function of the token ids alone.
"""

from __future__ import annotations

import logging
import time
from array import array
from typing import NamedTuple

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InitLoadBackParams,
    InsertParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_radix_cache import NodeId, UnifiedRadixCache

from . import blend_runtime
from .backups import Backup, BackupQueue
from .layer_load import LayerLoader
from .persist import StopSignals, persist
from .tier_link import Loaded, LoadPlan, Prefetch, TierLink, token_array

log = logging.getLogger(__name__)


class Staged(NamedTuple):
    """A load read from the store and scattered into device slots the tree does not own yet."""

    slots: torch.Tensor  # [hit_end - device_len] device slots, ours to free until inserted
    loaded: Loaded


class TieredRadixCache(UnifiedRadixCache):
    """A UnifiedRadixCache (Python tree core) whose device misses continue into a ``TieredStore``."""

    def __init__(self, params, *, link: TierLink) -> None:
        self.link = link
        self._plans: dict[str, LoadPlan] = {}  # rid -> the hits its last match reported
        self._prefetches: dict[str, Prefetch] = {}  # rid -> its prefetch, from a match until admission or release
        self._engine_busy = lambda: False  # bound to the scheduler's running batch by the plugin
        self.backups = BackupQueue(lambda job, valid: link.save_chunks(job.tokens, job.slots, job.chunks, valid))
        super().__init__(params)  # calls reset() on an empty tree: nothing to persist yet
        self.stop_signals: StopSignals | None = None  # set by the plugin in the scheduler process
        # CUDA: load-backs per layer, the forward waiting per layer; None on CPU (whole loads).
        self.layer_loader = LayerLoader.for_pool(self.token_to_kv_pool_allocator.get_kvcache(), link.device_kv)
        if self.page_size and link.chunk_size % self.page_size:
            raise ValueError(f"lmcache chunk_size={link.chunk_size} must be a multiple of --page-size={self.page_size}")

    # ---- load path ---------------------------------------------------------

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        req = params.req
        if req is not None and (blend := blend_runtime.active()) is not None:
            blend.note(req)  # once per request: its stored segments; marks a blend request
        if req is None or self.disable or not _storable(params.key):
            return result
        plan = self.link.plan(token_array(params.key.raw_token_ids()), result.device_prefix_len)
        if plan is None:
            self._plans.pop(req.rid, None)
            self._close_prefetch(req.rid)
            return result
        plan = self._arrived_part(req.rid, plan)
        if plan is None:
            self._plans.pop(req.rid, None)
            return result
        self._plans[req.rid] = plan
        anchor = result.last_device_node
        return result._replace(last_host_node=anchor, best_match_node=anchor,
                               host_hit_length=plan.hit_end - result.device_prefix_len,
                               full_kv_hit_length=max(result.full_kv_hit_length, plan.hit_end))

    def _arrived_part(self, rid: str, plan: LoadPlan) -> LoadPlan | None:
        """The leading part of ``plan`` that this request's prefetch holds in host memory on every rank.

        Starts the prefetch on the request's first match. A collective under TP
        (``plan`` was agreed, so every rank gets here).
        """
        prefetch = self._prefetches.get(rid)
        if prefetch is not None and prefetch.plan.keys[:1] != plan.keys[:1]:
            prefetch.close()  # the device match moved to another chunk: read from there
            prefetch = None
        if prefetch is None:
            prefetch = self._prefetches[rid] = self.link.start_prefetch(plan)
        arrived = self.link.agree.min(min(prefetch.arrived(), len(plan.keys)))  # [0, arrived) on every rank
        hit_end = (plan.first_chunk + arrived) * self.link.chunk_size
        admitting, prefetch.gate_open = prefetch.gate_open, False
        if hit_end <= plan.device_len:
            if admitting:
                self._close_prefetch(rid)  # admitted without a load: nothing left to wait for
            return None
        return plan._replace(tokens=plan.tokens[:hit_end], keys=plan.keys[:arrived], hit_end=hit_end)

    def check_prefetch_progress(self, request) -> bool:
        """The scheduler's admission gate for a queued request (``prefetch_policy``); a collective under TP."""
        prefetch = self._prefetches.get(request.rid)
        if prefetch is None:
            return True
        try:
            busy = bool(self._engine_busy())
        except Exception:  # noqa: BLE001 - a scheduler we cannot read: assume busy, never stall admission
            busy = True
        prefetch.gate_open = self.link.admit(prefetch, busy)
        return prefetch.gate_open

    def prefetch_from_storage(self, *args, **kwargs):
        return None  # our prefetch starts in match_prefix, where the scheduler's queue-time match lands

    def release_aborted_request(self, request) -> None:
        super().release_aborted_request(request)
        self._plans.pop(request.rid, None)
        if (blend := blend_runtime.active()) is not None:
            blend.forget(request.rid)
        self._close_prefetch(request.rid)

    def has_pending_cache_operations(self) -> bool:
        # Copies still running count; finished ones awaiting their unlock do not: the scheduler
        # releases them at its next step, and reset() (/flush_cache) unlocks them itself. Counting
        # them made every /flush_cache sent right after traffic fail with a 400, since SGLang
        # checks idleness before its step releases them.
        return (self.backups.unreleased() > self.backups.finished()
                or any(not p.done() for p in self._prefetches.values()))

    def check_hicache_events(self) -> None:
        """Per scheduler step: unlock the paths whose write-through copies every rank finished.

        A collective under TP when backups are unreleased (the count is equal on
        every rank). Prefetch progress is read at admission, not here.
        """
        if self.backups.unreleased():
            for job in self.backups.release(self.link.agree.min(self.backups.finished())):
                self.unlock(job.lock)

    def bind_engine_busy(self, busy) -> None:
        """``busy()``: whether the engine has requests running, read by best_effort admission."""
        self._engine_busy = busy

    def _close_prefetch(self, rid: str) -> None:
        prefetch = self._prefetches.pop(rid, None)
        if prefetch is not None:
            prefetch.close()

    def init_load_back(self, params: InitLoadBackParams):
        req = params.req
        plan = self._plans.pop(req.rid, None) if req is not None else None
        prefetch = self._prefetches.pop(req.rid, None) if req is not None else None
        try:
            if plan is None or prefetch is None or params.host_hit_length <= 0:
                return super().init_load_back(params)
            return self._load_back(plan, prefetch, req)
        finally:
            if prefetch is not None:
                prefetch.close()  # the load copied what it needed; the chunks stay in the host tier

    def _load_back(self, plan: LoadPlan, prefetch: Prefetch, req):
        staged = self._stage_quietly(plan, req, prefetch)
        # Collective: every rank holds this plan (its hit length was agreed in match_prefix).
        if not self.link.agree.min(int(staged is not None)):
            if staged is not None:
                log.warning("lmcache_sgl: %s: another TP rank could not load its %d tokens; prefilling instead",
                            req.rid, plan.hit_end - plan.device_len)
                self.token_to_kv_pool_allocator.free(staged.slots)  # not in the tree yet: still ours
            return 0, req.last_node
        try:
            adopted = self._insert_loaded(plan, req, staged)
        except Exception:  # noqa: BLE001 - engine boundary: a failed load is a miss
            log.exception("lmcache_sgl: inserting %d loaded tokens for %s failed; prefilling instead",
                          plan.hit_end - plan.device_len, req.rid)
            adopted = None
        return adopted if adopted is not None else (0, req.last_node)

    def _stage_quietly(self, plan: LoadPlan, req, prefetch: Prefetch) -> Staged | None:
        try:
            return self._stage(plan, req, prefetch)
        except Exception:  # noqa: BLE001 - engine boundary: a failed load is a miss
            log.exception("lmcache_sgl: loading %d tokens for %s failed; prefilling instead",
                          plan.hit_end - plan.device_len, req.rid)
            return None

    def _stage(self, plan: LoadPlan, req, prefetch: Prefetch) -> Staged | None:
        """Copy the prefetched plan into fresh device slots; None (nothing held) unless all of it fits."""
        # The scheduler holds a lock on req.last_node, the device match's end.
        if req.prefix_len != plan.device_len:
            log.debug("lmcache_sgl: %s: device match moved %d -> %d; skipping the load",
                      req.rid, plan.device_len, req.prefix_len)
            return None
        loaded = self.link.load_prefetched(plan, prefetch)
        if loaded is None:
            return None
        num_new = plan.hit_end - plan.device_len
        slots = self._alloc_device(num_new)
        if slots is None:
            log.warning("lmcache_sgl: %s: no room for %d loaded tokens; prefilling instead", req.rid, num_new)
            return None
        try:
            if self.layer_loader is not None:
                self.layer_loader.load(slots, loaded.kv)  # queued; the forward waits per layer
            else:
                self.link.device_kv.scatter(slots, loaded.kv)
        except Exception:
            self.token_to_kv_pool_allocator.free(slots)
            raise
        return Staged(slots, loaded)

    def _insert_loaded(self, plan: LoadPlan, req, staged: Staged) -> tuple[int, NodeId] | None:
        # From here the tree owns the slots: the insert adopts them (or frees them as duplicates).
        device_len, slots, loaded = plan.device_len, staged.slots, staged.loaded
        prefix = self.path_device_indices(req.last_node)[:device_len]
        key = RadixKey(array("q", plan.tokens.tolist()), req.extra_key, cache_salt=req.cache_salt)
        result = super().insert(InsertParams(key=key, value=torch.cat([prefix.to(slots.device), slots]),
                                          prev_prefix_len=device_len, inserted_len=device_len,
                                          priority=req.priority or 0))
        last = result.last_device_node
        if len(self.path_device_indices(last)) != plan.hit_end:
            log.warning("lmcache_sgl: %s: loaded prefix did not land whole in the tree; prefilling instead", req.rid)
            return None
        # The split of cached tokens in meta_info: disk ("storage") after host.
        req.storage_hit_length = loaded.disk_tokens
        req.storage_hit_start = plan.hit_end - loaded.disk_tokens
        req.host_hit_is_storage = False
        log.info("lmcache_sgl: %s: %d cached tokens = %d device + %d host + %d disk", req.rid, plan.hit_end,
                 device_len, loaded.host_tokens, loaded.disk_tokens)
        return slots.numel(), last

    def _alloc_device(self, num_tokens: int) -> torch.Tensor | None:
        allocator = self.token_to_kv_pool_allocator
        short = num_tokens - allocator.available_size()
        if short > 0:
            self.evict_for_alloc(EvictParams(num_tokens=short))
        return allocator.alloc(num_tokens)

    # ---- save path ---------------------------------------------------------

    def insert(self, params: InsertParams):
        result = super().insert(params)
        if not self.disable and _storable(params.key):
            try:
                self._write_through(params, result.last_device_node)
            except Exception:  # noqa: BLE001 - engine boundary: a failed backup is left to eviction
                log.exception("lmcache_sgl: starting a write-through backup failed")
        return result

    def _write_through(self, params: InsertParams, node: NodeId) -> None:
        """Lock the inserted path and queue the copy of its chunks that ``save_policy`` makes due."""
        tokens = token_array(params.key.raw_token_ids())
        chunks = self.link.backup_chunks(tokens, params.inserted_len)
        if not chunks:
            return
        slots = self.path_device_indices(node)  # [path length], root -> node
        if len(slots) < (chunks[-1] + 1) * self.link.chunk_size:
            return  # the insert stopped short of the key (cannot happen with page-aligned keys)
        lock = self.lock(node)
        if not self.backups.submit(Backup(tokens, slots, chunks, lock)):
            self.unlock(lock)  # too many copies waiting: eviction saves these chunks instead

    def _evict_device_leaf(self, node_id: NodeId, tracker):
        try:
            self._save_leaf(node_id)
        except Exception:  # noqa: BLE001 - engine boundary: never block an eviction
            log.exception("lmcache_sgl: could not save evicted node %s", node_id)
        return super()._evict_device_leaf(node_id, tracker)

    def _save_leaf(self, node_id: NodeId) -> None:
        node = self.tree_core.node_by_id(node_id)
        if node.key is None or not _storable(node.key):
            return
        path = []  # root-exclusive, root -> node
        while node.parent is not None:
            path.append(node)
            node = node.parent
        path.reverse()
        tokens = token_array([t for n in path for t in n.key.raw_token_ids()])
        slots = self.tree_core.collect_full_device_indices(node_id, node.id)  # [len(tokens)], root -> leaf
        if len(slots) != len(tokens):
            return  # part of the path is not on the device (cannot happen without HiCache)
        self.link.save_completed_chunks(tokens, slots, node_start=len(tokens) - len(path[-1].key))

    # ---- lifecycle ---------------------------------------------------------

    def on_release(self, req, *, checkpointed: bool) -> None:
        self._plans.pop(req.rid, None)  # matched but never admitted (aborted, finished elsewhere)
        self._close_prefetch(req.rid)
        super().on_release(req, checkpointed=checkpointed)

    def reset(self) -> None:
        """``/flush_cache``: save the device tree's full chunks, write the store to disk, drop the tree."""
        constructed = hasattr(self, "stop_signals")  # False inside UnifiedRadixCache.__init__
        if constructed:
            left_s = self._settle_backups(self.link.store.config.shutdown_flush_timeout_s)
            _quietly(lambda: persist(self, "/flush_cache", left_s), "persisting the cache")
        super().reset()
        if constructed:
            self._plans.clear()
            for rid in list(self._prefetches):
                self._close_prefetch(rid)

    def release_host_resources(self) -> None:
        """Shutdown (SGLang's ShutdownReq, or our SIGTERM/SIGINT handler): persist, close, chain the signal."""
        timeout_s = self.link.store.config.shutdown_flush_timeout_s
        left_s = self._settle_backups(timeout_s)
        _quietly(lambda: persist(self, "shutdown", left_s), "persisting the cache")
        self.backups.close()
        super().release_host_resources()
        _quietly(lambda: self.link.store.close(timeout_s=1.0), "closing the store")  # flushed just above
        if self.stop_signals is not None:
            self.stop_signals.chain()

    def _settle_backups(self, timeout_s: float) -> float:
        """Before the tree is dropped or saved whole: let running copies end, then forget them all.

        Returns what is left of ``timeout_s``, for the flush that follows (one bound for the whole stop).
        """
        start = time.monotonic()
        if not self.backups.wait_finished(timeout_s):
            log.error("lmcache_sgl: write-through copies still running after %.0f s; they are dropped", timeout_s)
        for job in self.backups.discard():
            _quietly(lambda job=job: self.unlock(job.lock), "unlocking a backed-up path")
        return max(0.0, timeout_s - (time.monotonic() - start))

    def available_and_evictable_str(self) -> str:
        c = self.link.counters
        return (super().available_and_evictable_str() + f"lmcache_sgl: loads={c.loads} host_tokens="
                f"{c.tokens['host']} disk_tokens={c.tokens['disk']} saved_chunks={c.saved_chunks}\n")


def _storable(key: RadixKey) -> bool:
    return key.extra_key is None and key.cache_salt is None and not key.is_bigram


def _quietly(fn, what: str) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001
        log.exception("lmcache_sgl: %s failed", what)
