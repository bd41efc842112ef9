"""The blend layer loop (CacheBlend), engine-agnostic, over a ``BlendLayers`` adapter.

Rows are the request's prompt tokens 0..N-1. Some rows ("reused") have stored,
re-rotated K/V (``InjectedKV``); the others must be computed. Per layer:

    layer <  check   every row runs; fresh K/V is written for every row
    layer == check   every row's q/k/v is computed; the selection (``select_recompute``)
                     keeps every non-reused row and the most deviating reused rows;
                     selected rows get fresh K/V, the other reused rows the injected K/V;
                     only selected rows attend and go on
    layer >  check   only selected rows run and write fresh K/V; the other reused
                     rows keep the injected K/V

So ratio 1 is a full prefill, and ratio 0 with check 0 is plain reuse of the
injected KV. Attention always spans all N rows of the layer's cache, causal by
position.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol, Sequence

import torch

from .selection import DeviationReduce, _identity, select_recompute


class BlendLayers(Protocol):
    """One decoder stack, as the blend loop drives it (implemented by an engine adapter)."""

    num_layers: int

    def qkv(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None,
            positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Input norm, QKV projection and RoPE at ``positions`` of the given rows.

        Returns q [n, Hq*D] or [n, Hq, D], k and v [n, Hkv, D], and the residual.
        """

    def write_kv(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V [n, Hkv, D] of request rows ``rows`` [n] into this layer's cache."""

    def attend(self, layer: int, q: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
        """Queries of rows ``q_rows`` attend over this layer's cache rows 0..N-1, causally by position."""

    def post(self, layer: int, attn_out: torch.Tensor,
             residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """O projection, post-attention norm and MLP (with residuals), row-wise."""


KVLoader = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class InjectedKV:
    """Stored K/V of the reused rows, re-rotated to their prompt positions.

    ``rows`` [R]: ascending request rows. ``kv(layer)`` -> (k, v), each [R, Hkv, D].
    ``prewritten``: the adapter already put this K/V into the request's cache for
    every layer, so the loop never writes it again (it only reads ``kv(check)`` for
    the selection, before the check layer writes anything).
    """

    def __init__(self, rows: torch.Tensor, k: Sequence[torch.Tensor] | None = None,
                 v: Sequence[torch.Tensor] | None = None, *, loader: KVLoader | None = None,
                 prewritten: bool = False) -> None:
        if (loader is None) == (k is None or v is None):
            raise ValueError("InjectedKV needs either per-layer k and v, or a loader")
        rows = rows.long()
        if rows.dim() != 1 or (rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all())):
            raise ValueError("InjectedKV rows must be a 1-D strictly ascending index tensor")
        self.rows = rows
        self.prewritten = prewritten
        self._loader = loader or (lambda layer: (k[layer], v[layer]))

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._loader(layer)
        if k.shape[0] != self.rows.numel() or v.shape[0] != self.rows.numel():
            raise ValueError(f"injected K/V of layer {layer} has {k.shape[0]}/{v.shape[0]} rows; "
                             f"expected {self.rows.numel()}")
        return k, v

    def write(self, layers: BlendLayers, layer: int, keep: torch.Tensor) -> None:
        """Write the injected K/V of reused rows ``self.rows[keep]`` (unless prewritten)."""
        if self.prewritten or keep.numel() == 0:
            return
        k, v = self.kv(layer)
        layers.write_kv(layer, self.rows[keep], k[keep], v[keep])


class BlendOutput(NamedTuple):
    hidden: torch.Tensor  # [m, hidden]: rows `rows` only, last prompt row included
    residual: torch.Tensor | None  # [m, hidden] or None, as the adapter's post() returns it
    rows: torch.Tensor  # [m] ascending request rows that ran every layer
    reused: int  # rows whose injected K/V stays in the cache from the check layer on
    recomputed: int  # reused rows recomputed from the check layer on


def blend_forward(layers: BlendLayers, hidden: torch.Tensor, residual: torch.Tensor | None,
                  positions: torch.Tensor, injected: InjectedKV, check_layer: int, ratio: float,
                  method: str = "hkvd", *, generator: torch.Generator | None = None,
                  deviation_reduce: DeviationReduce = _identity) -> BlendOutput:
    """Run all layers over a prompt's rows 0..N-1 (``hidden`` [N, hidden], ``positions`` [N])."""
    n = hidden.shape[0]
    _check_args(layers, n, positions, injected, check_layer)
    all_rows = torch.arange(n, device=hidden.device)
    for layer in range(check_layer):
        hidden, residual = _run_layer(layers, layer, hidden, residual, positions, all_rows)
    q, k, v, residual = layers.qkv(check_layer, hidden, residual, positions)
    rows = _select(injected, check_layer, k, v, ratio, method, generator, deviation_reduce)
    reused_keep = _unselected(injected.rows, rows)
    injected.write(layers, check_layer, reused_keep)
    layers.write_kv(check_layer, rows, k[rows], v[rows])
    out = layers.attend(check_layer, q[rows], rows)
    hidden, residual = layers.post(check_layer, out, None if residual is None else residual[rows])
    positions = positions[rows]
    for layer in range(check_layer + 1, layers.num_layers):
        injected.write(layers, layer, reused_keep)
        hidden, residual = _run_layer(layers, layer, hidden, residual, positions, rows)
    kept = int(reused_keep.numel())
    return BlendOutput(hidden, residual, rows, kept, injected.rows.numel() - kept)


def _run_layer(layers: BlendLayers, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None,
               positions: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    q, k, v, residual = layers.qkv(layer, hidden, residual, positions)
    layers.write_kv(layer, rows, k, v)
    return layers.post(layer, layers.attend(layer, q, rows), residual)


def _select(injected: InjectedKV, layer: int, k: torch.Tensor, v: torch.Tensor, ratio: float, method: str,
            generator: torch.Generator | None, deviation_reduce: DeviationReduce) -> torch.Tensor:
    n = k.shape[0]
    mask = torch.zeros(n, dtype=torch.bool, device=k.device)
    mask[injected.rows.to(k.device)] = True
    old_k, old_v = k.clone(), v.clone()  # rows outside the mask are ignored by the selection
    ik, iv = injected.kv(layer)
    old_k[mask], old_v[mask] = ik.to(k.device, k.dtype), iv.to(v.device, v.dtype)
    return select_recompute(k, v, old_k, old_v, mask, ratio, method=method, generator=generator,
                            deviation_reduce=deviation_reduce)


def _unselected(reused_rows: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Indices into ``reused_rows`` of the rows not in ``selected``."""
    return (~torch.isin(reused_rows, selected.to(reused_rows.device))).nonzero().flatten()


def _check_args(layers: BlendLayers, n: int, positions: torch.Tensor, injected: InjectedKV,
                check_layer: int) -> None:
    if not 0 <= check_layer < layers.num_layers:
        raise ValueError(f"blend check layer {check_layer} is invalid; allowed: 0..{layers.num_layers - 1}")
    if positions.shape != (n,):
        raise ValueError(f"positions must be [{n}], got {tuple(positions.shape)}")
    rows = injected.rows
    if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= n - 1):
        raise ValueError(f"reused rows must lie in [0, {n - 1}): the last prompt row is always computed")
