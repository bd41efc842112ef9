"""Engine KV pools described for the copy kernels.

Every supported pool is L layers x P planes (P=2: K and V, P=1: MLA latent) of
a strided 4-D view ``[num_blocks, page_size, num_heads, head_dim]`` whose last
dim is contiguous. Slot ``s`` is element ``[s // page_size, s % page_size]``.

    SGLang MHA  per layer K, V  [slots, H, D]           -> [slots, 1, H, D] each
    SGLang MLA  per layer       [slots, 1, R]           -> [slots, 1, 1, R]
    vLLM        per layer       [blocks, H, bs, 2*D]    -> K = [..., :D], V = [..., D:],
                                                           permuted to [blocks, bs, H, D]

SGLang pools are token-indexed (page_size 1 here whatever the engine's page
size: pages only decide which slot indices the engine hands over). vLLM's
per-layer tensor may be stored in any memory order; only its strides differ.

A ``PoolView`` is built once per engine pool: it validates the layer tensors and
uploads the table of per-plane base addresses that the Triton kernel reads.
It holds the layer tensors, so the addresses stay valid while it lives. Rebuild
it if the engine reallocates its pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# KV dtypes the copies accept, by item size. Copies move raw bits through an
# integer view of the same width, so they are exact for every dtype (NaNs too).
RAW_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)

# Base addresses at a multiple of this many bytes let the kernel use 16-byte
# vector loads and stores (it passes the hint only when all bases comply).
VECTOR_BYTES = 16


@dataclass(frozen=True, eq=False)
class PoolView:
    """L x P strided plane views of one engine pool plus their address table."""

    planes: tuple[torch.Tensor, ...]  # L*P raw integer views [num_blocks, page_size, H, D], index l*P + p
    num_layers: int
    num_planes: int  # P: 2 for K/V, 1 for MLA
    dtype: torch.dtype  # the engine's KV dtype (planes hold its raw bits)
    ptr_table: torch.Tensor  # [L*P] int64 on the pool device: planes[i].data_ptr()
    aligned: bool  # every base address is a multiple of VECTOR_BYTES (lets the kernel vectorize)

    @classmethod
    def build(cls, planes: Sequence[torch.Tensor], num_layers: int, num_planes: int) -> "PoolView":
        """Validate ``planes`` (each ``[num_blocks, page_size, H, D]``, index l*P + p) and upload their addresses."""
        _check_planes(planes, num_layers * num_planes)
        dtype = planes[0].dtype
        raw = tuple(p.view(RAW_DTYPES[dtype.itemsize]) for p in planes)
        addrs = [p.data_ptr() for p in raw]
        table = torch.tensor(addrs, dtype=torch.int64).to(planes[0].device)  # [L*P]
        aligned = all(a % VECTOR_BYTES == 0 for a in addrs)
        return cls(raw, num_layers, num_planes, dtype, table, aligned)

    @property
    def device(self) -> torch.device:
        return self.planes[0].device

    @property
    def num_blocks(self) -> int:
        return self.planes[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.planes[0].shape[1]

    @property
    def num_heads(self) -> int:
        return self.planes[0].shape[2]

    @property
    def head_dim(self) -> int:
        return self.planes[0].shape[3]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.page_size

    @property
    def raw_dtype(self) -> torch.dtype:
        return self.planes[0].dtype

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of the canonical chunk buffer for ``num_tokens`` tokens: [L, P, T, H, D]."""
        return (self.num_layers, self.num_planes, num_tokens, self.num_heads, self.head_dim)

    def empty_chunk(self, num_tokens: int, *, device: torch.device | str | None = None,
                    pin_memory: bool = False) -> torch.Tensor:
        """An uninitialised chunk buffer (default: on the pool device)."""
        device = self.device if device is None else device
        return torch.empty(self.chunk_shape(num_tokens), dtype=self.dtype, device=device, pin_memory=pin_memory)


def sglang_mha_pool(k_layers: Sequence[torch.Tensor], v_layers: Sequence[torch.Tensor]) -> PoolView:
    """SGLang's token-indexed MHA pool: per layer K and V, each ``[num_slots, H, D]``."""
    if len(k_layers) != len(v_layers):
        raise ValueError(f"got {len(k_layers)} K layers but {len(v_layers)} V layers; they must match")
    _check_ndim("sglang MHA layer", [*k_layers, *v_layers], 3, "[num_slots, heads, head_dim]")
    planes = [t.unsqueeze(1) for kv in zip(k_layers, v_layers) for t in kv]  # [S, 1, H, D] each
    return PoolView.build(planes, len(k_layers), 2)


def sglang_mla_pool(kv_layers: Sequence[torch.Tensor]) -> PoolView:
    """SGLang's MLA pool: per layer ``[num_slots, 1, kv_lora_rank + rope_dim]``."""
    _check_ndim("sglang MLA layer", kv_layers, 3, "[num_slots, 1, kv_lora_rank + rope_dim]")
    for t in kv_layers:
        if t.shape[1] != 1:
            raise ValueError(f"sglang MLA layer shape {tuple(t.shape)}: dim 1 must be 1 (one latent head)")
    planes = [t.unsqueeze(1) for t in kv_layers]  # [S, 1, 1, R] each
    return PoolView.build(planes, len(kv_layers), 1)


def vllm_pool(layers: Sequence[torch.Tensor]) -> PoolView:
    """vLLM's paged pool: per layer ``[num_blocks, kv_heads, block_size, 2*head_dim]``, any memory order."""
    _check_ndim("vllm layer", layers, 4, "[num_blocks, kv_heads, block_size, 2*head_dim]")
    width = layers[0].shape[3]
    if width % 2:
        raise ValueError(f"vllm layer last dim {width} must be even (K and V halves of 2*head_dim)")
    d = width // 2
    planes = [t[..., p * d:(p + 1) * d].permute(0, 2, 1, 3) for t in layers for p in (0, 1)]  # [NB, bs, H, D]
    return PoolView.build(planes, len(layers), 2)


def _check_ndim(what: str, tensors: Sequence[torch.Tensor], ndim: int, shape_doc: str) -> None:
    if len(tensors) == 0:
        raise ValueError(f"no {what} tensors given; need at least one layer")
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{what} must be a {ndim}-D tensor {shape_doc}, got {got}")


def _check_planes(planes: Sequence[torch.Tensor], expected: int) -> None:
    """All planes: same shape, strides, dtype and device; supported dtype; contiguous last dim."""
    if len(planes) != expected or expected == 0:
        raise ValueError(f"expected {expected} plane views, got {len(planes)}")
    first = planes[0]
    if first.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"KV dtype {first.dtype} is not supported; allowed: {list(SUPPORTED_DTYPES)}")
    if first.device.type not in ("cpu", "cuda"):
        raise ValueError(f"pool device {first.device} is not supported; allowed: cpu or cuda")
    if first.stride(3) != 1 and first.shape[3] > 1:
        raise ValueError(f"pool head_dim must be contiguous (stride 1), got strides {first.stride()}")
    if first.numel() == 0:
        raise ValueError(f"pool plane shape {tuple(first.shape)} is empty")
    for i, p in enumerate(planes):
        for attr in ("shape", "dtype", "device"):
            if getattr(p, attr) != getattr(first, attr):
                raise ValueError(f"pool layers differ in {attr}: plane {i} has {getattr(p, attr)}, "
                                 f"plane 0 has {getattr(first, attr)}; all layers must match")
        if p.stride() != first.stride():
            raise ValueError(f"pool layers differ in strides: plane {i} has {p.stride()}, "
                             f"plane 0 has {first.stride()}; all layers must match")
