"""Rank agreement under tensor parallelism: every rank must admit the same store hits.

Each TP rank has its own store (its keys carry ``tp_rank``), and the stores
drift apart: LRU by compressed size, a dropped put, a quarantined file or a
Redis error on one rank only. A rank that reports a longer hit, or loads what
another rank could not, builds a different batch than its peers, and the
next collective in the forward hangs or mixes garbage. So every decision
taken from a rank's own store is agreed first: a MIN all-reduce of integers
over the CPU (gloo) groups whose ranks build one batch, as SGLang's HiCache
does (``UnifiedRadixCache._all_reduce_attn_groups``).

Contract: ``min`` is a collective. Every rank of the groups must call it the
same number of times, in the same order, so call sites decide whether to call
it from values equal on every rank (the request's token ids, never a local
lookup).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


class RankAgreement:
    """MIN over the ranks that build the same batch; with one rank, the value itself."""

    def __init__(self, groups: Sequence[object | None] = ()) -> None:
        self.groups = tuple(g for g in groups if g is not None and dist.get_world_size(group=g) > 1)

    @classmethod
    def for_cache(cls, params) -> "RankAgreement":
        """The groups HiCache reduces over, from SGLang's ``CacheInitParams``.

        With DP attention the TP group spans several batches; then only the
        attention CP and TP groups build one batch. Otherwise it is the TP group.
        """
        attn = cls((getattr(params, "attn_cp_cache_group", None), getattr(params, "attn_tp_cache_group", None)))
        return attn if attn.groups else cls((getattr(params, "tp_cache_group", None),))

    @property
    def is_single_rank(self) -> bool:
        return not self.groups

    def min(self, value: int) -> int:
        """The smallest ``value`` any rank passed; a collective unless single-rank."""
        if not self.groups:
            return value
        agreed = torch.tensor([value], dtype=torch.int64)
        for group in self.groups:
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        return int(agreed.item())
