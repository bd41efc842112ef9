"""Our counters in vLLM's KV-connector stats: its periodic log line and, as ``vllm:lmcache_sgl_*``, /metrics.

Flow (vLLM V1): after each step every worker's connector returns the
counters that grew since its last report (``StatsReporter.take``); vLLM
aggregates the workers' reports, ships ``to_dict()`` to the frontend, which
rebuilds them (``LMCacheSGLConnector.build_kv_connector_stats``), aggregates
the steps of a logging interval and ``reduce()``s them to one line; the
Prometheus side (``LMCacheSGLPromMetrics``) records each report.

``data`` (plain dicts, so it survives vLLM's serialization):

    {"counters": {name: growth},                   summed by aggregate (over workers and steps)
     "gauges":   {tp_rank: {name: current value}}} per rank, the latest report wins; reduce sums the ranks
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from ..metrics import StoreStats, Tier

# Store counters (StoreStats fields; hit_chunks split per tier) and the worker's own.
STORE_COUNTERS = ("lookups", "miss_chunks", "put_chunks", "puts_dropped", "host_evictions", "writebacks",
                  "write_failures", "writes_abandoned", "raw_bytes_written", "encoded_bytes_written",
                  "corrupt_chunks", "cut_by_cost", "disk_evictions", "disk_quarantined", "disk_write_errors",
                  "remote_errors", "remote_breaker_trips", "write_through_dropped")
HIT_COUNTERS = tuple(f"hit_chunks_{t.value}" for t in Tier)
WORKER_COUNTERS = ("loaded_tokens", "recomputed_blocks")  # tokens loaded into vLLM's blocks; blocks failed to load
COUNTERS = STORE_COUNTERS + HIT_COUNTERS + WORKER_COUNTERS
GAUGES = ("host_entries", "host_bytes", "disk_entries", "disk_bytes", "pending_writes")
PREFIX = "lmcache_sgl_"


def counter_values(stats: StoreStats, worker: dict[str, int]) -> dict[str, int]:
    """Every counter's running total."""
    values = {name: getattr(stats, name) for name in STORE_COUNTERS}
    values.update((f"hit_chunks_{tier}", n) for tier, n in stats.hit_chunks.items())
    values.update((name, worker.get(name, 0)) for name in WORKER_COUNTERS)
    return values


@dataclass
class LMCacheSGLStats(KVConnectorStats):
    """One or more reports of counter growth and gauge snapshots (see the module docstring)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()
        unknown = set(self.data) - {"counters", "gauges"}
        if unknown:
            raise ValueError(f"lmcache_sgl stats data has unknown keys {sorted(unknown)}; allowed: counters, gauges")

    def reset(self) -> None:
        self.data = {"counters": {}, "gauges": {}}

    def aggregate(self, other: KVConnectorStats) -> "LMCacheSGLStats":
        if not isinstance(other, LMCacheSGLStats):
            raise ValueError(f"cannot aggregate lmcache_sgl stats with {type(other).__name__}")
        counters = self.data["counters"]
        for name, growth in other.data["counters"].items():
            counters[name] = counters.get(name, 0) + growth
        self.data["gauges"].update(other.data["gauges"])  # other is the later report of its ranks
        return self

    def reduce(self) -> dict[str, int | float]:
        """One interval's summary: counter growth, then gauges summed over TP ranks."""
        out: dict[str, int | float] = {PREFIX + k: v for k, v in self.data["counters"].items()}
        for name in GAUGES:
            values = [g[name] for g in self.data["gauges"].values() if name in g]
            if values:
                out[PREFIX + name] = sum(values)
        return out

    def is_empty(self) -> bool:
        return not self.data["counters"] and not self.data["gauges"]


class StatsReporter:
    """One worker's reports: what grew since the previous ``take``."""

    def __init__(self, tp_rank: int) -> None:
        self._rank = str(tp_rank)
        self._last: dict[str, int] = {}

    def take(self, stats: StoreStats, worker: dict[str, int]) -> LMCacheSGLStats | None:
        """The growth since the last call with this rank's gauges; None when no counter moved."""
        now = counter_values(stats, worker)
        growth = {k: v - self._last.get(k, 0) for k, v in now.items() if v != self._last.get(k, 0)}
        self._last = now
        if not growth:
            return None
        gauges = {name: getattr(stats, name) for name in GAUGES}
        return LMCacheSGLStats(data={"counters": growth, "gauges": {self._rank: gauges}})


class LMCacheSGLPromMetrics(KVConnectorPromMetrics):
    """``vllm:lmcache_sgl_<counter>_total`` and ``vllm:lmcache_sgl_<gauge>`` per engine, from each report."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counters = {n: self._counter_cls(name=f"vllm:{PREFIX}{n}", documentation=f"lmcache_sgl store: {n}",
                                         labelnames=labelnames) for n in COUNTERS}
        gauges = {n: self._gauge_cls(name=f"vllm:{PREFIX}{n}", documentation=f"lmcache_sgl store: {n}, "
                                     "summed over TP ranks", labelnames=labelnames, multiprocess_mode="mostrecent")
                  for n in GAUGES}
        # engine index -> metric name -> the metric bound to that engine's labels
        engines = per_engine_labelvalues.items()
        self._counters = {e: {n: m.labels(*lv) for n, m in counters.items()} for e, lv in engines}
        self._gauges = {e: {n: m.labels(*lv) for n, m in gauges.items()} for e, lv in engines}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        stats = LMCacheSGLStats(data=transfer_stats_data)
        for name, growth in stats.data["counters"].items():
            if name in self._counters[engine_idx] and growth > 0:
                self._counters[engine_idx][name].inc(growth)
        for name, value in stats.reduce().items():
            gauge = self._gauges[engine_idx].get(name[len(PREFIX):])
            if gauge is not None:
                gauge.set(value)
