"""The ``lmcache_sgl`` radix-cache backend: builds the store and the extended tree.

Runs in each scheduler process (SGLang's ``create_tree_cache``), after the
device KV pool and the model runner exist. Besides the tree it wires the
rank agreement (TP > 1) and the prefill clock that feeds the cost model.
Config: ``--lmcache-config-file`` (or ``LMCACHE_CONFIG_FILE``) and
``LMCACHE_*`` variables, as in the launcher.
"""

from __future__ import annotations

import functools
import logging

from ...config import CacheConfig
from ...model_identity import model_identity
from ...layout import ChunkLayout
from ...tiered_store import TieredStore
from . import prefill_clock
from .device_kv import DeviceKV, fingerprint, is_mha_pool
from .tier_link import TierLink
from .tp_agree import RankAgreement

log = logging.getLogger(__name__)


def build_tiered_radix_cache(ctx):
    """``RadixCacheFactory`` for ``--radix-cache-backend lmcache_sgl`` (set by ``--enable-lmcache``)."""
    from sglang.srt.mem_cache.registry import create_unified_radix_cache

    from .radix_cache import TieredRadixCache

    _check_supported(ctx)
    config = CacheConfig.load(ctx.server_args.lmcache_config_file)
    kvcache = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    device_kv = DeviceKV(kvcache)
    # The same name vLLM's connector and `lmcache-sgl prepopulate` use: shared keys.
    model = model_identity(ctx.server_args.model_path, config.model_id)
    fp = fingerprint(model, device_kv, ctx.tp_rank, ctx.tp_size)
    store = TieredStore(config, ChunkLayout(fp, config.chunk_size))
    # Saving an evicted leaf reads its token path from tree nodes, which only
    # the Python tree core exposes (the Rust core has no node_by_id).
    ctx.params.tree_core_backend = "python"
    link = TierLink(store, device_kv, fp, agree=RankAgreement.for_cache(ctx.params))
    cache = create_unified_radix_cache(ctx, cache_class=functools.partial(TieredRadixCache, link=link))
    _time_prefills(ctx, store, device_kv)
    if getattr(ctx.params, "enable_metrics", False):  # --enable-metrics: ours join SGLang's /metrics
        from .prom import start_for_scheduler

        start_for_scheduler(store, link, ctx.server_args.served_model_name or model, ctx.tp_rank)
    log.info("lmcache_sgl: tiered radix cache ready for %s: %d layers x %d KV heads x %d dims, %s, chunk %d tokens, "
             "host %.2f GiB, disk %s", model, fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.kv_dtype,
             config.chunk_size, config.host_bytes / (1 << 30), config.local_disk or "off")
    return cache


def _time_prefills(ctx, store: TieredStore, device_kv: DeviceKV) -> None:
    """Report the target model's prefill forwards to the store's cost model (``load_policy: auto``)."""
    runner = getattr(ctx.tp_worker, "model_runner", None)
    if runner is None:
        log.warning("lmcache_sgl: no model runner to time; load_policy=%s decides without a prefill rate",
                    store.config.load_policy)
        return
    prefill_clock.install(runner, store.record_prefill, device_kv.device)


def _check_supported(ctx) -> None:
    problems = []
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm:
        problems.append("hybrid sliding-window or Mamba models")
    if ctx.enable_hierarchical_cache:
        problems.append("--enable-hierarchical-cache")
    if ctx.disable_radix_cache:
        problems.append("--disable-radix-cache")
    if getattr(ctx.params, "pp_size", 1) > 1:
        problems.append("pipeline parallelism (--pp-size > 1)")
    if not is_mha_pool(ctx.params.token_to_kv_pool_allocator.get_kvcache()):
        problems.append("KV pools other than SGLang's MHA pool (e.g. MLA)")
    if problems:
        raise ValueError("lmcache_sgl's --enable-lmcache does not support " + ", ".join(problems) +
                         "; start without --enable-lmcache")
