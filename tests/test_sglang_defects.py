"""SGLang adapter regressions from issue 10: item 11 (prefill timings feed the cost model) and
item 12 (saved chunks record their start position)."""

from __future__ import annotations

import time
from array import array
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import require

require("sglang")

from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from lmcache_sgl import CacheConfig, ChunkLayout, TieredStore, prefix_keys  # noqa: E402
from lmcache_sgl.adapters.sglang.device_kv import DeviceKV, fingerprint  # noqa: E402
from lmcache_sgl.adapters.sglang.tier_link import TierLink  # noqa: E402
from lmcache_sgl.metrics import Tier  # noqa: E402
from lmcache_sgl.storage.chunk_file import read_header  # noqa: E402
from lmcache_sgl.storage.disk_tier import chunk_path  # noqa: E402
from sglang_cpu_cache import build_cpu_tiered_cache  # noqa: E402

C = 16
LAYERS, HEADS, DIM, SLOTS = 2, 2, 8, 256
PREFILL_TOKENS = 4096  # per fake prefill forward
PREFILL_S = 0.002  # its least duration: at most ~2M tokens/s


class FakeRunner:
    """A model runner whose forward takes PREFILL_S for an extend and nothing for a decode."""

    def __init__(self) -> None:
        self.calls = 0

    def forward(self, forward_batch, *args, **kwargs):
        self.calls += 1
        if forward_batch.forward_mode == ForwardMode.EXTEND:
            time.sleep(PREFILL_S)
        return ("output", forward_batch)


def build_cache(config_file, runner, monkeypatch):
    """The real TieredRadixCache on a CPU MHA pool, built by our factory as a scheduler builds it."""
    return build_cpu_tiered_cache(config_file, monkeypatch, model_path="/models/tiny-defects", runner=runner,
                                  layers=LAYERS, heads=HEADS, dim=DIM, slots=SLOTS)


def batch(mode: ForwardMode, tokens: int):
    return SimpleNamespace(forward_mode=mode, extend_num_tokens=tokens if mode != ForwardMode.DECODE else None)


def disk_only_chunk(cache, tokens: np.ndarray) -> None:
    """Put chunk 0 of ``tokens`` and write it down; with no host tier it lives on disk only."""
    store = cache.link.store
    key = prefix_keys(cache.link.fingerprint, tokens[:C], C)[0]
    kv = torch.randn(LAYERS, 2, C, HEADS, DIM, generator=torch.Generator().manual_seed(5)) + 1.0
    assert store.put(key, tokens[:C], kv, start_pos=0)
    store.flush()
    assert store.contains(key) == Tier.DISK


def store_hit(cache, tokens: np.ndarray, rid: str) -> int:
    req = SimpleNamespace(rid=rid, extra_key=None, cache_salt=None, session=None, priority=0)
    result = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens.tolist())), req=req))
    return result.host_hit_length


@pytest.fixture
def disk_cache(tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text(f"chunk_size: {C}\nlocal_cpu: false\nlocal_disk: {tmp_path / 'disk'}\nload_policy: auto\n")
    runner = FakeRunner()
    cache = build_cache(config, runner, monkeypatch)
    yield cache, runner
    cache.link.store.close()


def test_sglang_prefills_give_the_cost_model_a_prefill_rate(disk_cache):
    """Item 11: extend forwards through the model runner are timed; decode forwards are not."""
    cache, runner = disk_cache
    cost = cache.link.store.cost
    for _ in range(3):
        assert runner.forward(batch(ForwardMode.DECODE, 0))[0] == "output"
    assert cost.estimate(Tier.DISK, 1 << 20, C).recompute_s is None  # decodes are not prefills
    for _ in range(3):
        out = runner.forward(batch(ForwardMode.EXTEND, PREFILL_TOKENS))
        assert out[0] == "output" and out[1].extend_num_tokens == PREFILL_TOKENS
    assert runner.calls == 6
    recompute_s = cost.estimate(Tier.DISK, 1 << 20, PREFILL_TOKENS).recompute_s
    assert recompute_s is not None and recompute_s >= PREFILL_S * 0.9  # at most PREFILL_TOKENS per PREFILL_S


def test_auto_refuses_a_disk_hit_slower_than_recompute_under_sglang(disk_cache):
    """Item 11: after SGLang prefills, a disk that reads slower than recompute is not loaded."""
    cache, runner = disk_cache
    tokens = np.arange(500, 500 + C + 3, dtype=np.int64)
    disk_only_chunk(cache, tokens)
    # The first match starts the disk read (a prefetch) and reports what has arrived: 0, or C if the
    # prefetch thread was quicker than the report.
    assert store_hit(cache, tokens, "before") in (0, C)
    cache._prefetches["before"].handle.wait(10)
    assert store_hit(cache, tokens, "before") == C  # no prefill rate yet: every hit is worth loading
    for _ in range(40):  # a disk observed at 1 MiB per 5 s
        cache.link.store.cost.record_load(Tier.DISK, 1 << 20, 5.0)
    for _ in range(3):
        runner.forward(batch(ForwardMode.EXTEND, PREFILL_TOKENS))
    cut_before = cache.link.store.stats().cut_by_cost
    assert store_hit(cache, tokens, "after") == 0
    assert cache.link.store.stats().cut_by_cost == cut_before + 1


def test_sglang_saves_record_each_chunks_start_position(tmp_path):
    """Item 12: chunk i of a saved path says start_pos = i * chunk_size in its file header."""
    gen = torch.Generator().manual_seed(0)
    pool = [(torch.randn(SLOTS, HEADS, DIM, generator=gen), torch.randn(SLOTS, HEADS, DIM, generator=gen))
            for _ in range(LAYERS)]
    device_kv = DeviceKV(SimpleNamespace(start_layer=0, layer_num=LAYERS, get_kv_buffer=lambda i: pool[i]))
    fp = fingerprint("fake-model", device_kv, tp_rank=0, tp_size=1)
    disk = tmp_path / "disk"
    store = TieredStore(CacheConfig(chunk_size=C, local_cpu=False, local_disk=str(disk)), ChunkLayout(fp, C))
    try:
        link = TierLink(store, device_kv, fp)
        tokens = np.arange(10, 10 + 3 * C + 5, dtype=np.int64)
        slots = torch.randperm(SLOTS, generator=gen)[:len(tokens)]
        assert link.save_completed_chunks(tokens, slots, node_start=0) == 3
        store.flush()
        keys = prefix_keys(fp, tokens[:3 * C], C)
        starts = [read_header(chunk_path(disk, key).read_bytes())[0].start_pos for key in keys]
        assert starts == [0, C, 2 * C]
    finally:
        store.close()


class FakeCudaEvent:
    """torch.cuda.Event's timing surface; ``done`` stands for the device having passed the event."""

    clock_ms = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.done = False
        self.at_ms = None

    def record(self, stream=None) -> None:
        self.at_ms = FakeCudaEvent.clock_ms

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: "FakeCudaEvent") -> float:
        assert self.done and end.done, "reading an unfinished event would block the scheduler"
        return end.at_ms - self.at_ms


def test_cuda_prefill_timings_are_read_later_without_waiting(monkeypatch):
    """On CUDA the forward returns early: its timing is reported once its end event has completed."""
    from lmcache_sgl.adapters.sglang.prefill_clock import PrefillClock, extend_tokens

    events: list[FakeCudaEvent] = []

    def make_event(enable_timing=False):
        events.append(FakeCudaEvent(enable_timing))
        return events[-1]

    monkeypatch.setattr(torch.cuda, "Event", make_event)
    reported = []

    def forward(forward_batch):
        FakeCudaEvent.clock_ms += 40.0  # the device time the launch will take
        return "out"

    timed = PrefillClock(lambda n, s: reported.append((n, s)), extend_tokens, torch.device("cuda")).wrap(forward)
    assert timed(batch(ForwardMode.EXTEND, 512)) == "out"
    assert reported == []  # still running on the device: nothing read, nothing waited for
    for e in events:
        e.done = True
    assert timed(batch(ForwardMode.DECODE, 0)) == "out"
    assert reported == []  # decodes neither time nor poll
    timed(batch(ForwardMode.EXTEND, 256))
    assert reported == [(512, pytest.approx(0.040))]
