"""Our counters through vLLM V1's KV-connector stats: worker reports, vLLM's Scheduler, its log line and /metrics."""

from __future__ import annotations

import pytest
import torch

from conftest import require

require("vllm")
prometheus_client = require("prometheus_client")

import test_vllm_harness  # noqa: E402
from test_vllm_harness import Harness, write_model_dir  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging, KVConnectorProm  # noqa: E402

from lmcache_sgl.adapters.vllm import LMCacheSGLConnector  # noqa: E402
from lmcache_sgl.adapters.vllm_stats import LMCacheSGLStats  # noqa: E402

CHUNK = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama-stats")


def extra() -> dict:
    return {"chunk_size": CHUNK, "max_local_cpu_size": 0.01}


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def stats(counters: dict, gauges: dict | None = None) -> LMCacheSGLStats:
    return LMCacheSGLStats(data={"counters": dict(counters), "gauges": dict(gauges or {})})


def test_worker_reports_only_growth(model_dir):
    """A report holds what grew since the previous one; with nothing new there is no report."""
    h = Harness(model_dir, extra())
    p = prompt(100, seed=1)
    h.add(p)
    h.run()
    first = h.worker.get_kv_connector_stats()
    assert first.data["counters"]["put_chunks"] == 3 and first.data["gauges"]["0"]["host_entries"] == 3
    assert h.worker.get_kv_connector_stats() is None
    h.wipe()
    h.add(p)
    h.run()
    second = h.worker.get_kv_connector_stats().data["counters"]
    assert second["hit_chunks_host"] == 3 and second["loaded_tokens"] == 96
    assert "put_chunks" not in second  # nothing new was stored
    h.shutdown()


def test_aggregate_and_reduce():
    """Counters add over workers and steps; gauges keep each rank's latest value and reduce sums the ranks."""
    a = stats({"put_chunks": 2, "hit_chunks_host": 1}, {"0": {"host_bytes": 100}})
    b = stats({"put_chunks": 3}, {"1": {"host_bytes": 50}})
    later = stats({"miss_chunks": 1}, {"0": {"host_bytes": 70}})
    merged = a.aggregate(b).aggregate(later)
    assert merged.reduce() == {"lmcache_sgl_put_chunks": 5, "lmcache_sgl_hit_chunks_host": 1,
                               "lmcache_sgl_miss_chunks": 1, "lmcache_sgl_host_bytes": 120}
    assert not merged.is_empty() and LMCacheSGLStats().is_empty()
    merged.reset()
    assert merged.is_empty() and merged.reduce() == {}
    with pytest.raises(ValueError, match="unknown keys"):
        LMCacheSGLStats(data={"histograms": {}})
    payload = {"counters": {"put_chunks": 2}, "gauges": {}}
    rebuilt = LMCacheSGLConnector.build_kv_connector_stats(payload)
    rebuilt.aggregate(stats({"put_chunks": 3}))
    assert rebuilt.data["counters"]["put_chunks"] == 5
    assert payload["counters"]["put_chunks"] == 2  # vLLM's accumulator never mutates the payload it was given


def test_stats_reach_vllm_scheduler_log_and_prometheus(model_dir, monkeypatch):
    """Reports ride vLLM's KVConnectorOutput through its Scheduler into SchedulerStats, its log line and /metrics."""
    h = Harness(model_dir, extra())
    real_output = test_vllm_harness.KVConnectorOutput
    monkeypatch.setattr(test_vllm_harness, "KVConnectorOutput", lambda **kw: real_output(
        **kw, kv_connector_stats=h.worker.get_kv_connector_stats()))
    payloads = []
    real_update = h.scheduler.update_from_output

    def update(out, runner):
        result = real_update(out, runner)
        for engine_out in result.values():
            s = engine_out.scheduler_stats
            if s is not None and s.kv_connector_stats:
                payloads.append(s.kv_connector_stats)
        return result

    monkeypatch.setattr(h.scheduler, "update_from_output", update)
    p = prompt(100, seed=2)
    h.add(p)
    h.run()
    h.wipe()
    h.add(p)
    h.run()
    h.shutdown()
    assert payloads and all(isinstance(d, dict) for d in payloads)

    logging = KVConnectorLogging(h.vllm_config.kv_transfer_config)
    for d in payloads:
        logging.observe(d)
    lines = []
    logging.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    assert len(lines) == 1
    assert "lmcache_sgl_put_chunks=3" in lines[0] and "lmcache_sgl_hit_chunks_host=3" in lines[0], lines[0]
    assert "lmcache_sgl_loaded_tokens=96" in lines[0]

    labels = {"model_name": "tiny", "engine": "0"}
    prom = KVConnectorProm(h.vllm_config, list(labels), {0: list(labels.values())})
    try:
        for d in payloads:
            prom.observe(d, 0)
        sample = prometheus_client.REGISTRY.get_sample_value
        assert sample("vllm:lmcache_sgl_put_chunks_total", labels) == 3
        assert sample("vllm:lmcache_sgl_hit_chunks_host_total", labels) == 3
        assert sample("vllm:lmcache_sgl_host_entries", labels) == 3
    finally:
        _unregister("vllm:lmcache_sgl_")  # the metrics live in the global registry


def _unregister(prefix: str) -> None:
    registry = prometheus_client.REGISTRY
    for collector in list(registry._collector_to_names):
        if any(n.startswith(prefix) for n in registry._collector_to_names[collector]):
            registry.unregister(collector)
