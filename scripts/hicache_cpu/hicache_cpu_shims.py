"""CPU shims that let SGLang 0.5.23's HiCache run on a CPU-only torch, for the benchmark's `hicache` arm only.

Never imported by lmcache_sgl: ``sitecustomize.py`` next to this file applies
them in the server processes of that arm (its directory goes on PYTHONPATH).
Each patch is applied when its SGLang module is first imported, and only when
torch has no CUDA:

- host buffers: HiCache allocates its host pool with ``cudaHostRegister``
  (``pool_host.common.ALLOC_MEMORY_FUNCS``'s default); on CPU we allocate the
  same buffer unpinned (there is no device to pin for).
- ``pin_memory``: host pools keep ``pin_memory=True`` and pass it to
  ``torch.zeros`` when the storage prefetch asks for a staging page
  (``get_dummy_flat_data_page``), which CPU torch refuses; every host pool's
  flag is cleared once the base class has set it.
- ``transfer_kv_direct``: the ``--hicache-io-backend direct`` copy comes from
  sgl_kernel (CUDA only) and is left undefined on CPU; ours is a pure-torch
  row gather/scatter with the same arguments.
"""

from __future__ import annotations

import torch

COMMON = "sglang.srt.mem_cache.pool_host.common"
BASE = "sglang.srt.mem_cache.pool_host.base"
MHA = "sglang.srt.mem_cache.pool_host.mha"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t`` as (tokens, bytes per token): the copy is dtype-blind, as the CUDA kernel is."""
    if not t.is_contiguous():  # reshape would copy, and a write into the copy would be lost
        raise ValueError(f"transfer_kv_direct: a non-contiguous layer buffer {tuple(t.shape)} / {t.stride()}")
    return t.view(t.shape[0], -1).view(torch.uint8)


def transfer_kv_direct(src_layers, dst_layers, src_indices, dst_indices, page_size: int) -> None:
    """dst_layers[i][dst_indices] = src_layers[i][src_indices] for every i; indices are token slots."""
    if len(src_layers) != len(dst_layers):
        raise ValueError(f"transfer_kv_direct: {len(src_layers)} source layers but {len(dst_layers)} destinations")
    if src_indices.numel() != dst_indices.numel():
        raise ValueError(f"transfer_kv_direct: {src_indices.numel()} source slots, {dst_indices.numel()} destinations")
    src_idx, dst_idx = src_indices.to("cpu", torch.int64), dst_indices.to("cpu", torch.int64)
    for src, dst in zip(src_layers, dst_layers):
        dst_rows = _rows(dst)
        dst_rows.index_copy_(0, dst_idx, _rows(src).index_select(0, src_idx))


def _alloc_unpinned(dims, dtype, device, pin_memory, allocator, registration_granularity_bytes=None):
    """``alloc_with_host_register`` without the register: the same allocator, plain host memory."""
    return allocator.allocate(dims, dtype=dtype, device=device)


def patch(module) -> None:
    """Apply the shim that belongs to ``module`` (COMMON, BASE or MHA); a no-op with CUDA."""
    if torch.cuda.is_available():
        return
    if module.__name__ == COMMON:
        module.ALLOC_MEMORY_FUNCS["cpu"] = _alloc_unpinned
    elif module.__name__ == BASE:
        _unpin(module.HostKVCache)
    elif module.__name__ == MHA:
        module.transfer_kv_direct = transfer_kv_direct



def _unpin(host_kv_cache: type) -> None:
    """Wrap the base ``__init__`` that every host pool's ``__init__`` calls: the flag is off before they go on."""
    init = host_kv_cache.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.pin_memory = False

    host_kv_cache.__init__ = __init__
