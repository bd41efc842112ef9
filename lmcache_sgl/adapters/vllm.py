"""vLLM KV connector (V1 API) over the lmcache_sgl tiered store.

Enable it with::

    --kv-transfer-config '{"kv_connector": "LMCacheSGLConnector",
                           "kv_connector_module_path": "lmcache_sgl.adapters.vllm",
                           "kv_role": "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"chunk_size": 256, "local_disk": "/cache"}}'

Config: defaults, then the YAML file (``config_file`` in the extra config, or
``LMCACHE_CONFIG_FILE``), then ``LMCACHE_*`` variables, then the extra config
(keys as in ``CacheConfig``, optionally prefixed ``lmcache.``).

Keys are ``prefix_keys`` over the prompt's token ids with a fingerprint named
by ``model_identity``, so SGLang and vLLM serving the same checkpoint
share chunks. Each TP rank stores its own shard under keys that carry its rank.

Process layout: the scheduler connector lives with vLLM's scheduler, one worker
connector per TP rank. Each worker owns a store and answers the scheduler's
lookups over a Unix socket named by the engine id (``LookupServer``). Saves are
copied out of vLLM's blocks before the step ends; loads are synchronous.
Inside the connector a failure is a logged miss, never a crash.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ..config import CacheConfig
from ..model_identity import model_identity
from .vllm_scheduler import LMCacheSGLMetadata, LookupClient, SchedulerSide
from .vllm_stats import LMCacheSGLPromMetrics, LMCacheSGLStats
from .vllm_worker import LookupServer, WorkerSide, attention_backends

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

__all__ = ["LMCacheSGLConnector", "LMCacheSGLMetadata", "cache_config_from", "lookup_address"]


class LMCacheSGLConnector(KVConnectorBase_V1):
    """A best-effort prefix cache: a dropped save is a future miss, a failed load a recompute."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _log_through_vllm()
        transfer = vllm_config.kv_transfer_config
        self._config = cache_config_from(transfer.kv_connector_extra_config)
        self._block_size = _block_size(vllm_config, kv_cache_config)
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        self._engine_id = str(transfer.engine_id)
        self._disabled = _unsupported(vllm_config, kv_cache_config)
        if self._disabled:
            log.error("lmcache_sgl: connector disabled: %s", self._disabled)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._server: LookupServer | None = None
        if role == KVConnectorRole.SCHEDULER:
            _warn_if_load_failures_fail(transfer)
            addresses = [lookup_address(self._engine_id, r) for r in range(self._tp_size)]
            self._lookup = LookupClient(addresses, _authkey(self._engine_id))
            self._scheduler = SchedulerSide(self._lookup, self._config.chunk_size, self._block_size,
                                            self._config.save_unfull_chunk,
                                            can_load=transfer.is_kv_consumer and not self._disabled,
                                            can_save=transfer.is_kv_producer and not self._disabled)
        else:
            model_name = model_identity(vllm_config.model_config.model, self._config.model_id)
            self._worker = WorkerSide(self._config, model_name, self._block_size, _tp_rank(vllm_config),
                                      self._tp_size)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is only a future miss

    # ---- worker side -----------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._disabled or self._worker is None:
            return
        try:
            self._worker.register(kv_caches, attention_backends(self._vllm_config, kv_caches))
            rank = self._worker.fingerprint.tp_rank
            self._server = LookupServer(lookup_address(self._engine_id, rank), _authkey(self._engine_id),
                                        self._worker.lookup)
        except Exception:
            log.exception("lmcache_sgl: cannot use vLLM's KV cache layout; the connector stays idle")
            self._worker.close()

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        meta = self._bound_meta()
        if meta is not None:
            self._worker.step_started(meta)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._bound_meta()
        if meta is not None and meta.loads:
            self._worker.load(meta)
            self._worker.step_started(meta)  # the forward follows the synchronous loads

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        return  # all layers are saved together in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._bound_meta()
        if meta is not None:
            self._worker.step_ended()
            self._worker.save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None  # transfers complete within their step

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    # ---- stats (vLLM's periodic log line and /metrics) ---------------------------

    def get_kv_connector_stats(self) -> LMCacheSGLStats | None:
        """Worker side: the store's counters that grew since vLLM last asked (see ``vllm_stats.py``)."""
        return self._worker.take_stats() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> LMCacheSGLStats:
        return LMCacheSGLStats(data=copy.deepcopy(data) if data else {})  # the logger's aggregate mutates it

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return LMCacheSGLPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._lookup.close()

    def _bound_meta(self) -> LMCacheSGLMetadata | None:
        # Also without a store, so that every TP rank joins the load agreement (its loads fail).
        if self._worker is None or not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, LMCacheSGLMetadata) else None

    # ---- scheduler side --------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        self._scheduler.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self._scheduler.build_meta(scheduler_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._scheduler.finished(request)
        return False, None


def cache_config_from(extra_config: dict[str, Any] | None) -> CacheConfig:
    """The store config: YAML (``config_file`` or LMCACHE_CONFIG_FILE), LMCACHE_* variables, then ``extra_config``."""
    overrides = {str(k).removeprefix("lmcache."): v for k, v in (extra_config or {}).items()}
    path = overrides.pop("config_file", None)
    return CacheConfig.load(path=path, overrides=overrides)


def _log_through_vllm() -> None:
    """Send the ``lmcache_sgl`` loggers' records to vLLM's handlers (its format, ``VLLM_LOGGING_LEVEL``).

    Without this our INFO lines (hits per request) never show in a vLLM server's
    log. A user who configured the ``lmcache_sgl`` logger keeps that setup.
    """
    ours, theirs = logging.getLogger("lmcache_sgl"), logging.getLogger("vllm")
    if ours.handlers or ours.level != logging.NOTSET or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)  # propagation stays on: root's handlers (none in a vLLM server) see them too


def lookup_address(engine_id: str, tp_rank: int) -> str:
    """The Unix socket of a worker's LookupServer; engine ids are unique per engine and DP rank."""
    tag = hashlib.blake2b(engine_id.encode(), digest_size=8).hexdigest()
    return os.path.join(tempfile.gettempdir(), f"lmcache-sgl-{tag}-tp{tp_rank}.sock")


def _authkey(engine_id: str) -> bytes:
    return hashlib.blake2b(engine_id.encode(), digest_size=16, person=b"lmcsgl-lookup").digest()


def _block_size(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None") -> int:
    """The block size of vLLM's block ids (the KV cache group's, else the configured one)."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if groups:
        return groups[0].kv_cache_spec.block_size
    return vllm_config.cache_config.block_size


def _warn_if_load_failures_fail(transfer) -> None:
    """vLLM's default policy ends a request with an error when its load fails; the cache expects a recompute."""
    if transfer.is_kv_consumer and transfer.kv_load_failure_policy == "fail":
        log.warning('lmcache_sgl: kv_load_failure_policy is "fail": a chunk that goes missing or fails its '
                    'checksum between lookup and load will end its request with an error. Add '
                    '"kv_load_failure_policy": "recompute" to --kv-transfer-config to recompute it instead.')


def _tp_rank(vllm_config: "VllmConfig") -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, model_parallel_is_initialized

        if model_parallel_is_initialized():
            return get_tensor_model_parallel_rank()
    except Exception:
        pass
    return vllm_config.parallel_config.rank % vllm_config.parallel_config.tensor_parallel_size


def _unsupported(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None") -> str:
    """Why this deployment cannot use the connector, or "" when it can."""
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        return "pipeline parallelism is not supported (keys carry no pipeline stage)"
    if vllm_config.model_config is not None and vllm_config.model_config.use_mla:
        return "MLA models are not supported yet"
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if groups is not None and len(groups) > 1:
        return f"{len(groups)} KV cache groups (hybrid or sliding-window models) are not supported; need 1"
    return ""
