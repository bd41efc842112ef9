"""Our counters on SGLang's ``/metrics`` (``--enable-metrics``), prefixed ``lmcache_sgl_``.

SGLang runs ``prometheus_client`` in multiprocess mode: the launcher sets
``PROMETHEUS_MULTIPROC_DIR`` before it starts the scheduler processes, every
process writes its values to files there, and the HTTP server's ``/metrics``
merges them. A scheduler process that creates metrics of its own therefore
shows them on the same endpoint, with nothing to register.

``StoreExporter`` runs in each scheduler process: a daemon thread that every
``interval_s`` turns the growth of ``TieredStore.stats()`` and the link's
token counters into counter increments (counters only grow; a process that
restarts starts again from zero, as Prometheus expects), sets the gauges,
and feeds the histograms from the link's timed events (``instrument``).
Labels: SGLang's ``model_name`` and ``tp_rank``, so the ranks of one server
stay separate series and sum like SGLang's own.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Callable, NamedTuple

from ...metrics import StoreStats, TimedEvent, Timings
from ...tiered_store import TieredStore
from .tier_link import TierLink

log = logging.getLogger(__name__)

PREFIX = "lmcache_sgl_"
DEFAULT_INTERVAL_S = 1.0
LABELS = ("model_name", "tp_rank")
# Seconds: a host hit of one chunk takes ~1e-4 s, a cold disk read of a long prompt about a second.
LATENCY_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class CounterSpec(NamedTuple):
    name: str  # without the prefix and prometheus_client's "_total"
    doc: str
    extra: tuple[str, ...]  # labels besides LABELS


class Series(NamedTuple):
    """One counter series's total in a snapshot: which counter, its extra label values, the value."""

    name: str
    extra: tuple[str, ...]
    value: float


COUNTERS = (
    CounterSpec("hit_tokens", "Tokens loaded from our tiers into the device pool, by tier (disk includes remote); "
                              "the sum of meta_info.cached_tokens_details host and storage.", ("tier",)),
    CounterSpec("hit_chunks", "Chunks read from the store, by the tier that served them.", ("tier",)),
    CounterSpec("miss_chunks", "Store reads that stopped at a missing or unusable chunk.", ()),
    CounterSpec("lookups", "Store lookups (a request's cheap check of which chunks exist).", ()),
    CounterSpec("loads", "Loads into the device pool that succeeded.", ()),
    CounterSpec("load_failures", "Planned loads that could not be used; the request was prefilled.", ()),
    CounterSpec("saved_chunks", "Chunks saved from the device pool into the store.", ()),
    CounterSpec("save_failures", "Saves from the device pool that failed and were dropped.", ()),
    CounterSpec("puts_dropped", "Chunks not stored: no host slot and the write queue full.", ()),
    CounterSpec("write_through_dropped", "Write-throughs refused by a full queue (the chunk stays in RAM).", ()),
    CounterSpec("evictions", "Chunks evicted, by tier.", ("tier",)),
    CounterSpec("quarantined_files", "Disk chunk files that failed verification and were quarantined.", ()),
    CounterSpec("corrupt_chunks", "Chunks that failed verification on load (never served).", ()),
    CounterSpec("write_failures", "Failed write attempts to disk or remote (retried).", ()),
    CounterSpec("writes_abandoned", "Chunks given up after repeated write failures.", ()),
    CounterSpec("remote_errors", "Remote (Redis) operations that failed and became misses.", ()),
    CounterSpec("remote_breaker_trips", "Times the remote tier was skipped for a back-off after failures.", ()),
    CounterSpec("cut_by_cost", "Lookups shortened because recomputing beats loading.", ()),
    CounterSpec("bytes", "KV bytes moved: load (store to device), save (device to store), "
                         "written (encoded bytes to disk or remote).", ("direction",)),
    CounterSpec("transfer_seconds", "Seconds spent in loads and saves; rate(bytes)/rate(seconds) is the bandwidth.",
                ("direction",)),
)

_EXTRA = {s.name: s.extra for s in COUNTERS}

GAUGES = {
    "write_queue_depth": "Chunks waiting for the background writer.",
    "host_bytes": "Bytes held by the host tier.",
    "host_capacity_bytes": "Capacity of the host tier in bytes.",
    "disk_bytes": "Bytes held by the disk tier.",
    "disk_entries": "Chunk files in the disk tier.",
}

HISTOGRAMS = {
    "load": ("load_seconds", "Seconds to copy one request's hit chunks from the store into a host tensor."),
    "save": ("save_seconds", "Seconds to save one evicted node's chunks from the device pool into the store."),
    "prefetch_wait": ("prefetch_wait_seconds", "Seconds a queued request waited at admission for its prefetch."),
}


def totals(stats: StoreStats, link: TierLink | None, timed: dict[str, tuple[int, float]]) -> list[Series]:
    """Every counter's total now. ``timed``: bytes and seconds summed per direction so far."""
    out = [Series("hit_chunks", (tier,), n) for tier, n in stats.hit_chunks.items()]
    out += [Series("miss_chunks", (), stats.miss_chunks), Series("lookups", (), stats.lookups),
            Series("puts_dropped", (), stats.puts_dropped),
            Series("write_through_dropped", (), stats.write_through_dropped),
            Series("evictions", ("host",), stats.host_evictions), Series("evictions", ("disk",), stats.disk_evictions),
            Series("quarantined_files", (), stats.disk_quarantined), Series("corrupt_chunks", (), stats.corrupt_chunks),
            Series("write_failures", (), stats.write_failures), Series("writes_abandoned", (), stats.writes_abandoned),
            Series("remote_errors", (), stats.remote_errors),
            Series("remote_breaker_trips", (), stats.remote_breaker_trips),
            Series("cut_by_cost", (), stats.cut_by_cost),
            Series("bytes", ("written",), stats.encoded_bytes_written)]
    for direction, (nbytes, seconds) in timed.items():
        out += [Series("bytes", (direction,), nbytes), Series("transfer_seconds", (direction,), seconds)]
    if link is not None:
        c = link.counters
        out += [Series("hit_tokens", (tier,), n) for tier, n in dict(c.tokens).items()]
        out += [Series("loads", (), c.loads), Series("load_failures", (), c.load_failures),
                Series("saved_chunks", (), c.saved_chunks), Series("save_failures", (), c.save_failures)]
    return out


def gauges(stats: StoreStats) -> dict[str, float]:
    return {"write_queue_depth": stats.pending_writes, "host_bytes": stats.host_bytes,
            "host_capacity_bytes": stats.host_capacity_bytes, "disk_bytes": stats.disk_bytes,
            "disk_entries": stats.disk_entries}


class StoreExporter:
    """Mirrors one store (and its SGLang link) into prometheus_client metrics.

    ``registry=None`` registers nothing in-process: right in multiprocess mode,
    where ``/metrics`` reads the value files, and it lets several exporters live
    in one process. Tests pass a ``CollectorRegistry`` to read values back.
    """

    def __init__(self, store: TieredStore, link: TierLink | None, labels: dict[str, str],
                 timings: Timings | None = None, registry=None, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if set(labels) != set(LABELS):
            raise ValueError(f"labels must be exactly {LABELS}, got {sorted(labels)}")
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.store, self.link = store, link
        self.timings = timings or Timings()
        self.labels = {k: str(v) for k, v in labels.items()}
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}
        self._timed: dict[str, tuple[int, float]] = {"load": (0, 0.0), "save": (0, 0.0)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._build(registry)

    def _build(self, registry) -> None:
        from prometheus_client import Counter, Gauge, Histogram  # after PROMETHEUS_MULTIPROC_DIR is set

        self._counters = {s.name: Counter(PREFIX + s.name, s.doc, LABELS + s.extra, registry=registry)
                          for s in COUNTERS}
        self._gauges = {name: Gauge(PREFIX + name, doc, LABELS, registry=registry, multiprocess_mode="mostrecent")
                        for name, doc in GAUGES.items()}
        self._histograms = {kind: Histogram(PREFIX + name, doc, LABELS, registry=registry, buckets=LATENCY_BUCKETS)
                            for kind, (name, doc) in HISTOGRAMS.items()}

    def export(self) -> None:
        """Publish what changed since the last call (thread-safe)."""
        with self._lock:
            for event in self.timings.drain():
                self._observe(event)
            stats = self.store.stats()
            for series in totals(stats, self.link, self._timed):
                self._advance(series)
            for name, value in gauges(stats).items():
                self._gauges[name].labels(**self.labels).set(value)

    def _observe(self, event: TimedEvent) -> None:
        self._histograms[event.kind].labels(**self.labels).observe(event.seconds)
        if event.kind in self._timed:
            nbytes, seconds = self._timed[event.kind]
            self._timed[event.kind] = (nbytes + event.nbytes, seconds + event.seconds)

    def _advance(self, series: Series) -> None:
        key = (series.name, series.extra)
        delta = series.value - self._last.get(key, 0)
        if delta <= 0:  # a counter never goes down; a source that shrank is ignored until it grows past
            return
        self._last[key] = series.value
        extra = dict(zip(_EXTRA[series.name], series.extra))
        self._counters[series.name].labels(**self.labels, **extra).inc(delta)

    def start(self) -> "StoreExporter":
        """Export every ``interval_s`` on a daemon thread until ``stop``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmcache-sgl-metrics", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._export_quietly()
        self._export_quietly()  # the last changes before a stop

    def _export_quietly(self) -> None:
        try:
            self.export()
        except Exception:  # noqa: BLE001 - metrics must never take the scheduler down
            log.exception("lmcache_sgl: exporting metrics failed; retrying next interval")

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)


# ---- timing the link's loads, saves and admission waits --------------------

def instrument(link: TierLink, timings: Timings) -> None:
    """Record each load, save and admission wait of ``link`` (on this instance) into ``timings``.

    Wraps the instance's methods, so ``TieredRadixCache`` (which calls them
    through ``link``) is timed without knowing about metrics.
    """
    link.load = _timed_load(link.load, timings)
    link.load_prefetched = _timed_load(link.load_prefetched, timings)
    link.save_completed_chunks = _timed_save(link.save_completed_chunks, timings, link.store.layout.chunk_bytes)
    link.admit = _timed_admit(link.admit, timings)


def _timed_load(fn: Callable, timings: Timings) -> Callable:
    @functools.wraps(fn)
    def load(*args, **kwargs):
        start = time.perf_counter()
        loaded = fn(*args, **kwargs)
        if loaded is not None:  # a failed load is counted in load_failures, not timed
            timings.record("load", time.perf_counter() - start, loaded.kv.numel() * loaded.kv.element_size())
        return loaded
    return load


def _timed_save(fn: Callable, timings: Timings, chunk_bytes: int) -> Callable:
    @functools.wraps(fn)
    def save(*args, **kwargs):
        start = time.perf_counter()
        put = fn(*args, **kwargs)
        if put:
            timings.record("save", time.perf_counter() - start, put * chunk_bytes)
        return put
    return save


def _timed_admit(fn: Callable, timings: Timings) -> Callable:
    @functools.wraps(fn)
    def admit(prefetch, *args, **kwargs):
        admitted = fn(prefetch, *args, **kwargs)
        if admitted and prefetch.first_poll is not None:  # first_poll: set by admit on the first attempt
            timings.record("prefetch_wait", time.monotonic() - prefetch.first_poll)
        return admitted
    return admit


def start_for_scheduler(store: TieredStore, link: TierLink, model_name: str, tp_rank: int) -> StoreExporter | None:
    """In a scheduler process of a server started with ``--enable-metrics``: time the link, start exporting.

    Returns None (logged) when prometheus_client is missing or SGLang set up no
    multiprocess directory: the server then serves without our metrics.
    """
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("lmcache_sgl: --enable-metrics but no PROMETHEUS_MULTIPROC_DIR; our metrics are off")
        return None
    try:
        timings = Timings()
        exporter = StoreExporter(store, link, {"model_name": model_name, "tp_rank": str(tp_rank)}, timings)
    except ImportError as e:
        log.warning("lmcache_sgl: prometheus_client is not importable (%s); our metrics are off", e)
        return None
    instrument(link, timings)
    log.info("lmcache_sgl: exporting lmcache_sgl_* metrics every %.1f s (tp_rank %d)", exporter.interval_s, tp_rank)
    return exporter.start()
