"""SGLang plugin entry point (entry-point group ``sglang.srt.plugins``).

SGLang calls ``load()`` early in the launcher (before argument parsing) and in
every scheduler and detokenizer process. ``load()`` only registers hooks, so a
server started without ``--enable-lmcache`` runs stock SGLang (plus the CPU
shims, which change nothing on CUDA machines):

  launcher   ``ServerArgs.resolve_once`` (BEFORE): checks the sglang version and
             the cache config, then turns ``--enable-lmcache`` into
             ``--radix-cache-backend lmcache_sgl``. The stock flag would import
             the real ``lmcache`` package (``mem_cache/registry.py``), which is
             neither needed nor installed.
  scheduler  the ``lmcache_sgl`` radix backend builds ``TieredRadixCache``;
             ``Scheduler.init_schedule_policy`` (AFTER): with our tree, turns on the
             scheduler's own prefetch path (``Scheduler.enable_lmcache``, the
             instance attribute only: ``_prefetch_kvcache`` at queue time and the
             ``check_prefetch_progress`` admission gate), so disk and Redis reads
             run on the store's threads while the request waits;
             ``get_cached_tokens_details`` (AFTER) tags the per-tier breakdown
             in each response's ``meta_info``; ``Scheduler.run_event_loop``
             (BEFORE) installs the SIGTERM/SIGINT handlers that persist the
             cache on a stop (``persist.py``). With ``enable_blending`` the
             same schedule hook installs the blend runtime (``blend_runtime.py``);
             ``LlamaModel.forward`` and the prefill graph's ``can_run_graph``
             (AROUND) blend a batch with a blend request (``blend_hook.py``) and
             otherwise call SGLang's own code.
  control    ``Scheduler.get_internal_state`` (AROUND) answers the ``/lmcache/*``
             routes the launcher hook adds (``control_http.py``).
  detokenizer  ``DetokenizerManager.__init__`` (AFTER): outlives a process-group
             SIGTERM while the scheduler flushes (``persist.outlive_group_stop``).

A plugin that raises inside ``load()`` is only logged by SGLang, so every
check that must stop a launch runs in the ``resolve_once`` hook instead.
"""

from __future__ import annotations

import logging
from importlib import metadata

log = logging.getLogger(__name__)

SUPPORTED_SGLANG = "0.5.23"
BACKEND_NAME = "lmcache_sgl"

_RESOLVE_TARGET = "sglang.srt.server_args.ServerArgs.resolve_once"
_DETAILS_TARGET = ("sglang.srt.managers.scheduler_components.output_streamer."
                   "SchedulerOutputStreamer.get_cached_tokens_details")
_SCHEDULER_TARGET = "sglang.srt.managers.scheduler.Scheduler.init_schedule_policy"
_LOOP_TARGET = "sglang.srt.managers.scheduler.Scheduler.run_event_loop"
_DETOKENIZER_TARGET = "sglang.srt.managers.detokenizer_manager.DetokenizerManager.__init__"
_CONTROL_TARGET = "sglang.srt.managers.scheduler.Scheduler.get_internal_state"


class UnsupportedSGLang(RuntimeError):
    """The installed sglang is not the version this adapter is written against."""


def sglang_version() -> str:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        import sglang

        return getattr(sglang, "__version__", "unknown")


def check_sglang_version(found: str | None = None) -> None:
    """Raise ``UnsupportedSGLang`` unless sglang is exactly ``SUPPORTED_SGLANG``."""
    found = found or sglang_version()
    if found != SUPPORTED_SGLANG:
        raise UnsupportedSGLang(
            f"lmcache_sgl's --enable-lmcache supports sglang=={SUPPORTED_SGLANG} only, but sglang=={found} "
            f"is installed; install sglang=={SUPPORTED_SGLANG} or start without --enable-lmcache")


def load() -> None:
    """Register the hooks and the radix-cache backend (idempotent)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from . import cpu_shims

    if sglang_version() != SUPPORTED_SGLANG:
        log.warning("lmcache_sgl: sglang %s is installed; --enable-lmcache needs sglang==%s",
                    sglang_version(), SUPPORTED_SGLANG)
    HookRegistry.register(_RESOLVE_TARGET, before_resolve_once, HookType.BEFORE)
    HookRegistry.register(_DETAILS_TARGET, after_cached_tokens_details, HookType.AFTER)
    HookRegistry.register(_SCHEDULER_TARGET, after_init_schedule_policy, HookType.AFTER)
    HookRegistry.register(_LOOP_TARGET, before_run_event_loop, HookType.BEFORE)
    HookRegistry.register(_DETOKENIZER_TARGET, after_detokenizer_init, HookType.AFTER)
    from .control_http import around_get_internal_state

    HookRegistry.register(_CONTROL_TARGET, around_get_internal_state, HookType.AROUND)
    _register_blend_hooks(HookRegistry, HookType)
    _register_backend()
    cpu_shims.apply()  # last: its ValueError (a bad LMCACHE_SGL_CPU_EXTEND_ATTN) must not skip the hooks


def before_resolve_once(server_args, *args, **kwargs):
    """Validate and rewrite ``--enable-lmcache`` before SGLang resolves its arguments.

    Raises (stopping the launcher before any process starts) on an unsupported
    sglang, a bad cache config, or flags the tiered cache cannot serve.
    """
    if getattr(server_args, "_resolution_finished", False) or not getattr(server_args, "enable_lmcache", False):
        return None
    check_sglang_version()
    from ...config import CacheConfig

    config = CacheConfig.load(server_args.lmcache_config_file)  # ConfigError names the bad key
    if server_args.radix_cache_backend not in (None, BACKEND_NAME):
        raise ValueError(f"--enable-lmcache selects --radix-cache-backend {BACKEND_NAME}; "
                         f"drop --radix-cache-backend {server_args.radix_cache_backend}")
    if server_args.enable_hierarchical_cache:
        raise ValueError("--enable-lmcache brings its own host and disk tiers; drop --enable-hierarchical-cache")
    if server_args.disable_radix_cache:
        raise ValueError("--enable-lmcache extends the radix cache; drop --disable-radix-cache")
    server_args.enable_lmcache = False  # keep SGLang off its own LMCache code paths
    server_args.radix_cache_backend = BACKEND_NAME
    from .control_http import install_routes

    install_routes()  # /lmcache/* on this process's HTTP app, answered by the schedulers
    log.info("lmcache_sgl: --enable-lmcache -> radix cache backend %r (chunk_size=%d, host %.2f GiB, disk %s)",
             BACKEND_NAME, config.chunk_size, config.max_local_cpu_size if config.local_cpu else 0.0,
             config.local_disk or "off")
    return None


def after_cached_tokens_details(details, streamer, req, *args, **kwargs):
    """Name our disk tier in ``meta_info.cached_tokens_details`` (SGLang calls it "storage"); add blend counts."""
    if not _is_ours(getattr(streamer, "tree_cache", None)):
        return None
    details = _with_blend_counts(details, req)
    if details is None:
        return None
    details.setdefault("storage", 0)
    details["storage_backend"] = BACKEND_NAME
    return details


def after_init_schedule_policy(result, scheduler, *args, **kwargs):
    """Route the scheduler's queue-time prefetch and admission gate to our tree (runs once, after the tree exists).

    The flag is the scheduler's copy of ``--enable-lmcache`` (our launcher hook
    cleared the server argument so SGLang never imports the real ``lmcache``);
    with it the scheduler calls ``match_prefix`` when it queues a request,
    ``check_prefetch_progress`` before admitting it, ``check_hicache_events``
    each step and ``has_pending_cache_operations`` before idling.
    """
    tree = getattr(scheduler, "tree_cache", None)
    if not _is_ours(tree):
        return None
    scheduler.enable_lmcache = True
    if tree.link.store.config.enable_blending:
        from .blend_runtime import install_for_scheduler

        install_for_scheduler(scheduler, tree)  # raises (stops the launch) on a model blending cannot serve
    tree.bind_engine_busy(lambda: not scheduler.running_batch.is_empty() or scheduler.chunked_req is not None)
    return None


def before_run_event_loop(scheduler, *args, **kwargs):
    """In the scheduler's main thread, before serving: a stop signal persists the cache first."""
    from .persist import StopSignals

    tree = getattr(scheduler, "tree_cache", None)
    if _is_ours(tree):
        signals = StopSignals(scheduler, tree.link.store.config.shutdown_flush_timeout_s)
        if signals.install():
            tree.stop_signals = signals
    return None


def after_detokenizer_init(result, manager, server_args, *args, **kwargs):
    """With our tree, the detokenizer outlives a group SIGTERM while the scheduler flushes."""
    if getattr(server_args, "radix_cache_backend", None) != BACKEND_NAME:
        return None
    from ...config import CacheConfig
    from .persist import outlive_group_stop

    outlive_group_stop(CacheConfig.load(server_args.lmcache_config_file).shutdown_flush_timeout_s)
    return None


def _with_blend_counts(details, req):
    """``"blend"``: prompt tokens loaded from stored segments; ``"blend_recomputed"``: of those, recomputed."""
    from .blend_runtime import active

    runtime = active()
    finished = getattr(req, "finished", lambda: True)()
    stats = runtime.stats(req.rid, finished=finished) if runtime is not None else None
    if stats is None:
        return details
    details = dict(details) if details is not None else {"device": 0, "host": 0}
    details["blend"], details["blend_recomputed"] = stats.reused, stats.recomputed
    return details


def _register_blend_hooks(registry, hook_type) -> None:
    """Both hooks call SGLang's original unless this process has an active blend runtime."""
    from .blend_hook import FORWARD_TARGET, GRAPH_TARGET, around_can_run_graph, around_llama_forward

    registry.register(FORWARD_TARGET, around_llama_forward, hook_type.AROUND)
    registry.register(GRAPH_TARGET, around_can_run_graph, hook_type.AROUND)


def _is_ours(tree_cache) -> bool:
    from .radix_cache import TieredRadixCache

    return isinstance(tree_cache, TieredRadixCache)


def _register_backend() -> None:
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends

    from .factory import build_tiered_radix_cache

    if BACKEND_NAME not in registered_radix_cache_backends():
        register_radix_cache_backend(BACKEND_NAME, build_tiered_radix_cache)
