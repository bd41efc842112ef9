"""Load or recompute: a slow tier is skipped once recompute is known to be faster."""

import pytest

from conftest import prompt_chunks, store_config
from lmcache_sgl import Tier, TieredStore
from lmcache_sgl.cost_model import CostModel


def test_loads_everything_until_a_prefill_rate_is_known():
    model = CostModel("auto")
    assert model.estimate(Tier.DISK, 1 << 30, 100).recompute_s is None
    assert model.worth_loading(Tier.DISK, 1 << 30, 100)


def test_slow_disk_loses_to_fast_prefill_and_always_overrides():
    auto, always = CostModel("auto"), CostModel("always")
    for m in (auto, always):
        m.record_load(Tier.DISK, 1 << 30, 1.0)  # ~1.07 GB/s
        m.record_prefill(16_000, 0.59)  # Llama-8B on an H100: 27k tokens/s
    # 16k tokens x 128 KiB = 2 GiB: ~2 s from disk vs 0.59 s of recompute
    est = auto.estimate(Tier.DISK, 16_000 * (128 << 10), 16_000)
    assert est.load_s > est.recompute_s and not est.load_wins
    assert not auto.worth_loading(Tier.DISK, 16_000 * (128 << 10), 16_000)
    assert always.worth_loading(Tier.DISK, 16_000 * (128 << 10), 16_000)
    assert auto.worth_loading(Tier.HOST, 16_000 * (128 << 10), 16_000)  # 10 GB/s prior: 0.2 s


def test_estimates_follow_measurements():
    m = CostModel()
    before = m.bandwidth(Tier.DISK)
    for _ in range(30):
        m.record_load(Tier.DISK, 4 << 30, 1.0)
    assert m.bandwidth(Tier.DISK) > 2 * before
    m.record_load(Tier.DISK, 10, 1e-9)  # tiny transfers are ignored
    assert m.bandwidth(Tier.DISK) < 5e9


def test_bad_policy_is_rejected():
    with pytest.raises(ValueError, match="allowed"):
        CostModel("sometimes")


def test_store_lookup_stops_where_recompute_wins(layout, tmp_path):
    keys, toks, kvs = prompt_chunks(layout, 4)
    cfg = store_config(layout, host_chunks=2, disk_dir=tmp_path, disk_chunks=10)
    with TieredStore(cfg, layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
        store.flush_pending()
        assert store.lookup(keys).tiers == (Tier.DISK, Tier.DISK, Tier.HOST, Tier.HOST)
        store.record_prefill(layout.chunk_size * 10**6, 1.0)  # an absurdly fast engine
        assert store.lookup(keys).num_hits == 0 and store.stats().cut_by_cost == 1
    with TieredStore(cfg.replace(load_policy="always"), layout) as store:
        store.record_prefill(layout.chunk_size * 10**6, 1.0)
        assert store.lookup(keys).num_hits == 4
