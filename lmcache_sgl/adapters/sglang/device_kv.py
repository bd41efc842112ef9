"""SGLang's device KV pool seen as canonical chunks, and the model's fingerprint.

SGLang's MHA pool is token-indexed: per layer, K and V are ``[slots, H, D]``.
A chunk in the store is ``[L, 2, T, H, D]`` (see ``lmcache_sgl.layout``).
The copies are ``lmcache_sgl.triton_kernels``: Triton on CUDA, torch on CPU.
"""

from __future__ import annotations

import torch

from ...keys import ModelFingerprint
from ...layout import dtype_name
from ...triton_kernels import TransferStream, gather, scatter, sglang_mha_pool


class DeviceKV:
    """Gather pool slots into a chunk and scatter a chunk into pool slots.

    Both copies are synchronous with respect to the engine: on CUDA the device
    is synchronized first, so a gather never reads KV that a forward pass is
    still writing, and a scatter is complete before the next forward reads it.
    A gather runs on a side stream (``TransferStream``), so called from a
    worker thread it never queues behind, or in front of, the forward's kernels.
    ``scatter_layer`` is the one asynchronous copy (``layer_load.LayerLoader``).
    """

    def __init__(self, kvcache) -> None:
        layers = range(kvcache.start_layer, kvcache.start_layer + kvcache.layer_num)
        kv = [kvcache.get_kv_buffer(i) for i in layers]
        self.pool = sglang_mha_pool([k for k, _ in kv], [v for _, v in kv])
        self.layer_pools = [sglang_mha_pool([k], [v]) for k, v in kv]  # one view per layer, for layer-wise loads
        self.num_layers = len(kv)
        self.num_kv_heads = self.pool.num_heads
        self.head_dim = self.pool.head_dim
        self.dtype = self.pool.dtype
        self.device = self.pool.device
        self._stream = TransferStream(self.device) if self.device.type == "cuda" else None  # for gathers

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """Slots [T] -> a host chunk [L, 2, T, H, D]. Thread-safe; blocks the calling thread only."""
        self.sync()
        slots = slots.to(self.device, torch.int64)
        if self.device.type != "cuda":
            return gather(self.pool, slots, check_slots=False)
        out = self.pool.empty_chunk(slots.numel(), device="cpu", pin_memory=True)  # written by the kernel
        with self._stream.launch(slots) as done:
            gather(self.pool, slots, out, check_slots=False)
        done.synchronize()
        return out

    def scatter_layer(self, layer: int, slots: torch.Tensor, layer_kv: torch.Tensor) -> None:
        """Queue the copy of ``layer_kv`` [1, 2, T, H, D] (host) into ``layer``'s pool ``slots`` [T].

        Asynchronous on CUDA: it runs on the caller's current stream (a
        ``TransferStream`` side stream), and the caller synchronizes.
        """
        pool = self.layer_pools[layer]
        scatter(pool, slots.to(self.device, torch.int64, non_blocking=True),
                layer_kv.to(self.device, non_blocking=True), check_slots=False)

    def scatter(self, slots: torch.Tensor, chunk: torch.Tensor) -> None:
        """Write ``chunk`` [L, 2, T, H, D] into pool ``slots`` [T]."""
        self.sync()
        scatter(self.pool, slots.to(self.device, torch.int64), chunk.to(self.device), check_slots=False)
        self.sync()

    def sync(self) -> None:
        """On CUDA, wait for all the device's work (every stream); nothing on CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def is_mha_pool(kvcache) -> bool:
    """True for SGLang's plain MHA pool (separate per-layer K and V buffers)."""
    try:
        k, v = kvcache.get_kv_buffer(kvcache.start_layer)
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return False
    return isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == 3 and v.shape == k.shape


def fingerprint(model_name: str, device_kv: DeviceKV, tp_rank: int, tp_size: int) -> ModelFingerprint:
    return ModelFingerprint(model_name=model_name, kv_dtype=dtype_name(device_kv.dtype),
                            num_layers=device_kv.num_layers, num_kv_heads=device_kv.num_kv_heads,
                            head_dim=device_kv.head_dim, tp_rank=tp_rank, tp_size=tp_size)
