"""The real TieredRadixCache on a CPU MHA pool, built by our factory as an SGLang scheduler builds it.

Shared by the in-process SGLang adapter tests; importing it needs sglang.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


def build_cpu_tiered_cache(config_file, monkeypatch, *, model_path: str, layers: int, heads: int, dim: int,
                           slots: int, runner=None):
    """A float32 MHA pool of ``slots`` tokens, page size 1, and our radix cache over it (TP 1)."""
    from sglang.srt.mem_cache import registry
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    from lmcache_sgl.adapters.sglang.factory import build_tiered_radix_cache

    # The only runtime-context reads on this path; a launched server publishes them (defaults here).
    monkeypatch.setattr(registry, "get_disagg", lambda: SimpleNamespace(disaggregation_decode_retraction_backup=None))
    monkeypatch.setattr(registry, "get_memory", lambda: SimpleNamespace(enable_unified_cache_external_linker=False))
    kv = MHATokenToKVPool(size=slots, page_size=1, dtype=torch.float32, head_num=heads, head_dim=dim,
                          layer_num=layers, device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(slots, torch.float32, "cpu", kv, need_sort=False)
    req_pool = ReqToTokenPool(size=4, max_context_len=512, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator,
                             page_size=1)
    ctx = SimpleNamespace(
        server_args=SimpleNamespace(lmcache_config_file=str(config_file), model_path=model_path),
        params=params, is_hybrid_swa=False, is_hybrid_ssm=False, enable_hierarchical_cache=False,
        disable_radix_cache=False, tp_worker=SimpleNamespace(model_runner=runner), tp_rank=0, tp_size=1)
    return build_tiered_radix_cache(ctx)
