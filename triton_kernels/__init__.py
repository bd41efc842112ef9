"""GPU <-> chunk-buffer copies for engine KV pools (Triton on CUDA, torch reference on CPU).

Build a ``PoolView`` once per engine pool, then gather slots into the
canonical chunk layout ``[L, P, T, H, D]`` or scatter a chunk back::

    pool = sglang_mha_pool(k_layers, v_layers)
    chunk = gather(pool, slots)            # [L, 2, T, H, D]
    scatter(pool, new_slots, chunk)

See docs/kernels.md for layouts and the side-stream contract (``TransferStream``).
"""

from .dispatch import Backend, gather, resolve_backend, scatter
from .pools import PoolView, sglang_mha_pool, sglang_mla_pool, vllm_pool
from .streams import TransferHandle, TransferStream

__all__ = ["Backend", "PoolView", "TransferHandle", "TransferStream", "gather", "resolve_backend", "scatter",
           "sglang_mha_pool", "sglang_mla_pool", "vllm_pool"]
