"""Our counters on SGLang's /metrics: the exporter on its own, then a real CPU server with --enable-metrics.

The exporter tests use a real ``TieredStore`` and ``TierLink`` over a fake
SGLang MHA pool (plain tensors, as in ``test_sglang_tier_link.py``) and a
private ``CollectorRegistry``; one test runs the exporter in a child process in
prometheus_client's multiprocess mode, as a scheduler does, and reads the
values back the way SGLang's /metrics does. The server test checks the hit
counters against the ``cached_tokens_details`` SGLang returned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require

prometheus_client = require("prometheus_client")

from lmcache_sgl.adapters.sglang.prom import StoreExporter, instrument  # noqa: E402
from lmcache_sgl.metrics import Timings  # noqa: E402
from test_sglang_tier_link import SLOTS, link  # noqa: E402,F401 (link: the fake-pool fixture)

LABELS = {"model_name": "fake-model", "tp_rank": "0"}


@pytest.fixture
def exported(link):
    """(registry, exporter) with the link's loads, saves and admissions timed."""
    registry = prometheus_client.CollectorRegistry()
    timings = Timings()
    instrument(link, timings)
    return registry, StoreExporter(link.store, link, LABELS, timings, registry=registry)


def value(registry, name: str, **extra) -> float:
    got = registry.get_sample_value(name, {**LABELS, **extra})
    return 0.0 if got is None else got


def path(num_tokens: int, seed: int = 1):
    rnd = np.random.default_rng(seed)
    tokens = rnd.integers(0, 1000, num_tokens).astype(np.int64)
    slots = torch.from_numpy(rnd.permutation(SLOTS)[:num_tokens].astype(np.int64))
    return tokens, slots


def test_exporter_mirrors_store_and_link_counters(link, exported):
    """After a save and a load, every exported counter equals the store's and the link's own numbers."""
    registry, exporter = exported
    tokens, slots = path(50)
    assert link.save_completed_chunks(tokens, slots, node_start=0) == 3
    loaded = link.load(link.plan(tokens, device_len=20))  # tokens [20, 48) from the host tier
    exporter.export()
    stats = link.store.stats()
    assert value(registry, "lmcache_sgl_hit_tokens_total", tier="host") == loaded.host_tokens == 28
    assert value(registry, "lmcache_sgl_hit_tokens_total", tier="disk") == 0
    assert value(registry, "lmcache_sgl_hit_chunks_total", tier="host") == stats.hit_chunks["host"] == 2
    assert value(registry, "lmcache_sgl_saved_chunks_total") == 3
    assert value(registry, "lmcache_sgl_loads_total") == 1
    assert value(registry, "lmcache_sgl_lookups_total") == stats.lookups > 0
    assert value(registry, "lmcache_sgl_bytes_total", direction="load") == loaded.kv.numel() * 4  # fp32
    assert value(registry, "lmcache_sgl_bytes_total", direction="save") == 3 * link.store.layout.chunk_bytes
    assert value(registry, "lmcache_sgl_transfer_seconds_total", direction="load") > 0
    assert value(registry, "lmcache_sgl_load_seconds_count") == 1
    assert value(registry, "lmcache_sgl_save_seconds_count") == 1
    assert value(registry, "lmcache_sgl_host_bytes") == stats.host_bytes == 3 * link.store.layout.chunk_bytes


def test_repeated_exports_add_only_the_growth(link, exported):
    """A counter grows by what happened between two exports, never by the running total again."""
    registry, exporter = exported
    tokens, slots = path(40)
    link.save_completed_chunks(tokens, slots, node_start=0)
    plan = link.plan(tokens, device_len=0)
    link.load(plan)
    exporter.export()
    exporter.export()  # nothing new
    assert value(registry, "lmcache_sgl_hit_tokens_total", tier="host") == 32
    link.load(plan)
    exporter.export()
    assert value(registry, "lmcache_sgl_hit_tokens_total", tier="host") == 64
    assert value(registry, "lmcache_sgl_load_seconds_count") == 2


def test_failed_load_is_counted_not_timed(link, exported):
    """A chunk lost between plan and load: a load failure and a miss, no load latency recorded."""
    registry, exporter = exported
    tokens, slots = path(40)
    link.save_completed_chunks(tokens, slots, node_start=0)
    plan = link.plan(tokens, device_len=0)
    link.store.remove(plan.keys[1])
    assert link.load(plan) is None
    exporter.export()
    assert value(registry, "lmcache_sgl_load_failures_total") == 1
    assert value(registry, "lmcache_sgl_miss_chunks_total") == 1
    assert value(registry, "lmcache_sgl_load_seconds_count") == 0


def test_prefetch_admission_wait_is_observed(link, exported):
    """An admitted prefetch records one wait, and its loaded tokens count as host hits."""
    registry, exporter = exported
    tokens, slots = path(48)
    link.save_completed_chunks(tokens, slots, node_start=0)
    plan = link.plan(tokens, device_len=0)
    prefetch = link.start_prefetch(plan)
    prefetch.handle.wait(10)
    assert link.admit(prefetch, engine_busy=False)
    loaded = link.load_prefetched(plan, prefetch)
    prefetch.close()
    exporter.export()
    assert value(registry, "lmcache_sgl_prefetch_wait_seconds_count") == 1
    assert value(registry, "lmcache_sgl_hit_tokens_total", tier="host") == loaded.host_tokens == 48


def test_bad_exporter_arguments_are_refused(link):
    with pytest.raises(ValueError, match="labels must be exactly"):
        StoreExporter(link.store, link, {"model_name": "m"}, registry=prometheus_client.CollectorRegistry())
    with pytest.raises(ValueError, match="interval_s"):
        StoreExporter(link.store, link, LABELS, registry=prometheus_client.CollectorRegistry(), interval_s=0)


def test_timings_stay_bounded_when_nobody_drains():
    """Undrained events past max_events drop the oldest and are counted; a drain empties the record."""
    timings = Timings(max_events=3)
    for i in range(5):
        timings.record("load", float(i), nbytes=10 * i)
    assert timings.dropped == 2
    assert [e.seconds for e in timings.drain()] == [2.0, 3.0, 4.0]
    assert timings.drain() == []
    with pytest.raises(ValueError, match="max_events"):
        Timings(max_events=0)


CHILD = textwrap.dedent("""
    import sys
    import torch
    from lmcache_sgl import CacheConfig, ChunkLayout, ModelFingerprint, TieredStore
    from lmcache_sgl.adapters.sglang.prom import StoreExporter
    fp = ModelFingerprint("child-model", "float32", num_layers=2, num_kv_heads=2, head_dim=8)
    layout = ChunkLayout(fp, 16)
    store = TieredStore(CacheConfig(chunk_size=16, max_local_cpu_size=8 * layout.chunk_bytes / 2**30,
                                    local_disk=None), layout)
    kv = torch.randn(layout.shape(16), generator=torch.Generator().manual_seed(3))
    store.put("k0", list(range(16)), kv)
    store.get(["k0", "k1"])
    exporter = StoreExporter(store, None, {"model_name": "child-model", "tp_rank": sys.argv[1]}, interval_s=0.05)
    exporter.start()
    exporter.stop()  # exports once more on the way out
    store.close()
""")


def test_multiprocess_mode_values_reach_a_merged_scrape(tmp_path):
    """Two processes export in multiprocess mode; a MultiProcessCollector (SGLang's /metrics) sees both ranks."""
    from prometheus_client import multiprocess

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for rank in ("0", "1"):
        subprocess.run([sys.executable, "-c", CHILD, rank], check=True, env=env, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    registry = prometheus_client.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    for rank in ("0", "1"):
        labels = {"model_name": "child-model", "tp_rank": rank}
        assert registry.get_sample_value("lmcache_sgl_hit_chunks_total", {**labels, "tier": "host"}) == 1
        assert registry.get_sample_value("lmcache_sgl_miss_chunks_total", labels) == 1
        assert registry.get_sample_value("lmcache_sgl_host_bytes", labels) > 0


# ---- a real CPU SGLang server with --enable-metrics --------------------------

SERVER_CHUNK = 64
PREFIX = 512  # 8 chunks
SERVER_CHUNK_BYTES = 2 * 2 * SERVER_CHUNK * 2 * 16 * 4  # layers * K/V * tokens * kv heads * head dim * fp32


def prompt(seed: int, n: int) -> list[int]:
    rnd = np.random.default_rng(seed)
    return [int(t) for t in rnd.integers(3, 500, n)]


def scrape(server) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels without the rank labels): value summed over ranks}."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(server.url("/metrics"), timeout=30)
    r.raise_for_status()
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("tp_rank", "model_name")))
            out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
    return out


@pytest.mark.sglang
@pytest.mark.slow
def test_server_metrics_match_cached_tokens_details(tmp_path):
    """After host hits, /metrics shows our hit tokens equal to meta_info's host/storage counts, next to SGLang's."""
    require("sglang")
    from lmcache_sgl.adapters.sglang.local_server import LocalServer
    from lmcache_sgl.models import build_tiny_llama
    import requests

    model = build_tiny_llama(tmp_path / "tiny-llama")
    cfg = tmp_path / "lmcache.yaml"
    host_gib = 20.5 * SERVER_CHUNK_BYTES / 2**30
    cfg.write_text(f"chunk_size: {SERVER_CHUNK}\nlocal_cpu: true\nmax_local_cpu_size: {host_gib!r}\n"
                   f"local_disk: {tmp_path / 'disk'}\nmax_local_disk_size: 1\nprefetch_policy: wait_complete\n"
                   # saves on eviction only, so A is the host tier's newest entry when it returns
                   "save_policy: write_back\n")
    server = LocalServer(model, tmp_path / "server.log",
                         ["--enable-lmcache", "--lmcache-config-file", str(cfg), "--enable-metrics"])
    details = []

    def generate(ids):
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
        r = requests.post(server.url("/generate"), json=body, timeout=120)
        r.raise_for_status()
        details.append(r.json()["meta_info"].get("cached_tokens_details") or {})

    a = prompt(1, PREFIX)
    try:
        generate(a + [7, 8, 9])
        for i in range(3):  # 1200 tokens through a 1024-token device pool: A leaves it for the host tier
            generate(prompt(100 + i, 400))
        generate(a + [13, 14, 15])
        generate(a + [16, 17, 18])  # a device hit now: our counters must not move
        host = sum(d.get("host", 0) for d in details)
        disk = sum(d.get("storage", 0) for d in details)
        deadline = time.monotonic() + 30
        while True:  # the exporter publishes every second
            m = scrape(server)
            got = (m.get(("lmcache_sgl_hit_tokens_total", (("tier", "host"),)), 0.0),
                   m.get(("lmcache_sgl_hit_tokens_total", (("tier", "disk"),)), 0.0))
            if got == (host, disk) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        server.stop()
    assert host == PREFIX, json.dumps(details)  # the scenario did produce host hits
    assert got == (host, disk), (got, details)
    assert m.get(("lmcache_sgl_hit_chunks_total", (("tier", "host"),)), 0.0) >= PREFIX // SERVER_CHUNK
    assert m.get(("lmcache_sgl_saved_chunks_total", ()), 0.0) >= PREFIX // SERVER_CHUNK
    assert m.get(("lmcache_sgl_load_seconds_count", ()), 0.0) >= 1
    assert ("lmcache_sgl_write_queue_depth", ()) in m
    assert any(name.startswith("sglang:") for name, _ in m), "SGLang's own metrics disappeared"
