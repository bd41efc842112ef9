"""SGLang's UnifiedRadixCache extended with our host and disk tiers.

Protocol with the scheduler (sglang 0.5.23, the HiCache load-back path):

1. ``match_prefix`` runs SGLang's device match, then asks the store for the
   chunks that follow it. Hits are reported as ``host_hit_length`` (tokens
   beyond the device match), so admission budgets for them.
2. On admission the scheduler calls ``init_load_back``: the chunks are read,
   scattered into newly allocated device slots and inserted into the tree, so
   the tree owns them at once. It returns ``(loaded tokens, new last node)``;
   all promised tokens or none (a failed load is a logged miss and the
   request is prefilled). The scheduler raises on a partial commit
   (``schedule_policy.py``: "must commit all promised FULL tokens or none").
3. ``_evict_device_leaf`` (allocator-driven eviction) first puts the full
   chunks that the leaf completes into the store. A chunk may span several
   nodes; its earlier tokens sit in ancestors, which are still on the device
   because eviction takes leaves first.

The tier split of a request's cached tokens goes to ``req.storage_hit_*``,
which SGLang turns into ``meta_info.cached_tokens_details``
(device / host / storage = our disk tier).

Tensor parallelism: each rank consults its own store, so both decisions taken
from it are agreed with a MIN over the TP CPU group (``tp_agree``), as
HiCache does: the hit length in ``match_prefix`` (inside ``TierLink.plan``)
and the load's success in ``init_load_back``. If any rank could not stage the
whole load, every rank frees its staged slots and prefills.

Namespaced requests (LoRA ``extra_key``, ``cache_salt``) and EAGLE bigram keys
bypass the store: their KV is not a function of the token ids alone.
"""

from __future__ import annotations

import logging
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

from .tier_link import LoadPlan, Loaded, TierLink, token_array

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
        super().__init__(params)
        if self.page_size and link.chunk_size % self.page_size:
            raise ValueError(f"lmcache chunk_size={link.chunk_size} must be a multiple of --page-size={self.page_size}")

    # ---- load path ---------------------------------------------------------

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        req = params.req
        if req is None or self.disable or not _storable(params.key):
            return result
        plan = self.link.plan(token_array(params.key.raw_token_ids()), result.device_prefix_len)
        if plan is None:
            self._plans.pop(req.rid, None)
            return result
        self._plans[req.rid] = plan
        anchor = result.last_device_node
        return result._replace(last_host_node=anchor, best_match_node=anchor,
                               host_hit_length=plan.hit_end - result.device_prefix_len,
                               full_kv_hit_length=max(result.full_kv_hit_length, plan.hit_end))

    def init_load_back(self, params: InitLoadBackParams):
        req = params.req
        plan = self._plans.pop(req.rid, None) if req is not None else None
        if plan is None or params.host_hit_length <= 0:
            return super().init_load_back(params)
        staged = self._stage_quietly(plan, req)
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

    def _stage_quietly(self, plan: LoadPlan, req) -> Staged | None:
        try:
            return self._stage(plan, req)
        except Exception:  # noqa: BLE001 - engine boundary: a failed load is a miss
            log.exception("lmcache_sgl: loading %d tokens for %s failed; prefilling instead",
                          plan.hit_end - plan.device_len, req.rid)
            return None

    def _stage(self, plan: LoadPlan, req) -> Staged | None:
        """Read the plan into fresh device slots; None (nothing held) unless all of it arrived."""
        # The scheduler holds a lock on req.last_node, the device match's end.
        if req.prefix_len != plan.device_len:
            log.debug("lmcache_sgl: %s: device match moved %d -> %d; skipping the load",
                      req.rid, plan.device_len, req.prefix_len)
            return None
        loaded = self.link.load(plan)
        if loaded is None:
            return None
        num_new = plan.hit_end - plan.device_len
        slots = self._alloc_device(num_new)
        if slots is None:
            log.warning("lmcache_sgl: %s: no room for %d loaded tokens; prefilling instead", req.rid, num_new)
            return None
        try:
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
        result = self.insert(InsertParams(key=key, value=torch.cat([prefix.to(slots.device), slots]),
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
        super().on_release(req, checkpointed=checkpointed)

    def reset(self) -> None:
        """Drop the device tree (``/flush_cache``); the store keeps its chunks and writes them to disk."""
        super().reset()
        link = getattr(self, "link", None)
        if link is not None:
            self._plans.clear()
            _quietly(link.store.flush, "flushing the store")

    def release_host_resources(self) -> None:
        super().release_host_resources()
        _quietly(self.link.store.close, "closing the store")

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
