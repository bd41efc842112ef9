"""Pick the copy implementation: the Triton kernel on CUDA pools, the torch reference on CPU.

``backend="auto"`` (the default) chooses Triton when the pool is on CUDA and
triton is installed with compiled kernels, else torch. Tests force
``backend="triton"`` on CPU tensors, which needs ``TRITON_INTERPRET=1`` in the
environment before this package is imported (Triton decides at import whether
a kernel is interpreted). Interpreted kernels read the address table on the
host, so they run on CPU pools only; compiled ones on CUDA pools only.
"""

from __future__ import annotations

from typing import Literal

import torch

from . import paged_copy
from ._triton_compat import HAVE_TRITON, is_interpreted
from .pools import PoolView

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")


def resolve_backend(pool: PoolView, backend: Backend = "auto") -> Literal["triton", "torch"]:
    """The implementation ``backend`` means for ``pool``; ValueError if it cannot run here."""
    if not isinstance(pool, PoolView):
        raise ValueError(f"pool must be a PoolView (see sglang_mha_pool, vllm_pool), got {type(pool).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not known; allowed: {list(BACKENDS)}")
    if backend == "torch":
        return "torch"
    on_cuda = pool.device.type == "cuda"
    # The interpreter dereferences the address table on the host: CPU memory only.
    runs_here = HAVE_TRITON and on_cuda != is_interpreted(paged_copy._paged_copy_kernel)
    if backend == "auto":
        return "triton" if on_cuda and runs_here else "torch"
    if runs_here:
        return "triton"
    if not HAVE_TRITON:
        raise ValueError("backend 'triton' needs the triton package; allowed here: 'torch' or 'auto'")
    if on_cuda:
        raise ValueError("backend 'triton' on a CUDA pool needs compiled kernels, but TRITON_INTERPRET=1 was set "
                         "when lmcache_sgl.triton_kernels was imported; allowed here: 'torch' or 'auto'")
    raise ValueError(f"backend 'triton' on a {pool.device.type} pool needs TRITON_INTERPRET=1 set before "
                     "importing lmcache_sgl.triton_kernels; allowed here: 'torch' or 'auto'")


def gather(pool: PoolView, slots: torch.Tensor, out: torch.Tensor | None = None, *,
           backend: Backend = "auto", check_slots: bool = True) -> torch.Tensor:
    """Copy pool ``slots`` [T] into a chunk buffer [L, P, T, H, D] and return it.

    ``out`` defaults to a new buffer on the pool device; on CUDA it may be
    pinned host memory (zero-copy). The copy is queued on the current stream;
    run it inside ``TransferStream.launch`` to overlap it with compute.
    ``check_slots=False`` skips the bounds check, which reads ``slots`` back
    (a host sync on CUDA); pass it only for slots the engine allocator produced.
    """
    kind = resolve_backend(pool, backend)
    if out is None and isinstance(slots, torch.Tensor):
        out = pool.empty_chunk(slots.shape[0] if slots.dim() == 1 else 0)  # bad slots raise below
    if kind == "triton":
        return paged_copy.gather_triton(pool, slots, out, check_slots=check_slots)
    return paged_copy.gather_torch(pool, slots, out, check_slots=check_slots)


def scatter(pool: PoolView, slots: torch.Tensor, chunk: torch.Tensor, *,
            backend: Backend = "auto", check_slots: bool = True) -> None:
    """Copy ``chunk`` [L, P, T, H, D] into pool ``slots`` [T] (distinct). Same options as ``gather``."""
    if resolve_backend(pool, backend) == "triton":
        paged_copy.scatter_triton(pool, slots, chunk, check_slots=check_slots)
    else:
        paged_copy.scatter_torch(pool, slots, chunk, check_slots=check_slots)
