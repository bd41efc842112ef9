"""Which tokens a blend recomputes: CacheBlend's HKVD rule, or a random control.

At the check layer every token's fresh K/V is known, and so is the stored
(injected) K/V of the reused tokens. HKVD ("high KV deviation") recomputes the
reused tokens whose fresh K/V differ most from the stored K/V: those are the
tokens whose cross-document attention the stored KV missed.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

METHODS = ("hkvd", "random")
DeviationReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def recompute_count(ratio: float, num_reused: int) -> int:
    """ceil(ratio * num_reused): ratio 0 recomputes none, ratio 1 all."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"recompute ratio={ratio} is invalid; allowed: a number in [0, 1]")
    return min(num_reused, math.ceil(round(ratio * num_reused, 9)))


def kv_deviation(fresh_k: torch.Tensor, fresh_v: torch.Tensor, old_k: torch.Tensor,
                 old_v: torch.Tensor) -> torch.Tensor:
    """[n] float32: sum over heads and head_dim of the squared K and V differences, per token."""
    dk = (fresh_k.float() - old_k.float()).pow(2).flatten(1).sum(1)
    dv = (fresh_v.float() - old_v.float()).pow(2).flatten(1).sum(1)
    return dk + dv


def select_recompute(fresh_k: torch.Tensor, fresh_v: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor,
                     reused_mask: torch.Tensor, ratio: float, *, method: str = "hkvd",
                     generator: torch.Generator | None = None,
                     deviation_reduce: DeviationReduce = _identity) -> torch.Tensor:
    """Sorted row indices [m] (int64) to recompute from the check layer on.

    ``fresh_k``/``fresh_v`` [N, H, D]: every row's K/V computed now. ``old_k``/``old_v``
    [N, H, D]: the injected K/V; rows where ``reused_mask`` [N] is False are ignored.
    The result is every row with ``reused_mask`` False, plus ``recompute_count(ratio, R)``
    of the R reused rows: the most deviating ones (ties broken by lower row) for
    ``"hkvd"``, uniformly drawn ones with ``generator`` for ``"random"``.
    ``deviation_reduce`` maps the [R] float32 deviations before the choice (under TP:
    a SUM all-reduce, so every rank picks the same rows).
    """
    if method not in METHODS:
        raise ValueError(f"selection method {method!r} is invalid; allowed: {METHODS}")
    n = fresh_k.shape[0]
    if reused_mask.shape != (n,) or reused_mask.dtype != torch.bool:
        raise ValueError(f"reused_mask must be a bool tensor [{n}], got {reused_mask.dtype} {tuple(reused_mask.shape)}")
    for name, t in (("fresh_v", fresh_v), ("old_k", old_k), ("old_v", old_v)):
        if t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} rows; fresh_k has {n}")
    reused = reused_mask.nonzero().flatten()  # [R] ascending
    chosen = _choose(reused, ratio, method, generator, lambda: deviation_reduce(
        kv_deviation(fresh_k[reused], fresh_v[reused], old_k[reused], old_v[reused])))
    keep = ~reused_mask
    keep[chosen] = True
    return keep.nonzero().flatten()


def _choose(reused: torch.Tensor, ratio: float, method: str, generator: torch.Generator | None,
            deviation: Callable[[], torch.Tensor]) -> torch.Tensor:
    count = recompute_count(ratio, reused.numel())
    if method == "random":
        # Always draw, even when count is 0 or R, so every rank's generator advances alike.
        order = torch.randperm(reused.numel(), generator=generator).to(reused.device)
    else:
        # Computed (and reduced) even when count is 0 or R: under TP every rank must join the all-reduce.
        order = torch.sort(deviation(), descending=True, stable=True).indices
    return reused[order[:count]]
