"""TierLink, the store side of the SGLang extension, on a fake SGLang MHA pool (no sglang needed)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmcache_sgl import CacheConfig, ChunkLayout, TieredStore
from lmcache_sgl.adapters.sglang.device_kv import DeviceKV, fingerprint
from lmcache_sgl.adapters.sglang.tier_link import TierLink, _split_by_tier
from lmcache_sgl.adapters.sglang.tp_agree import RankAgreement
from lmcache_sgl.metrics import Tier

C = 16  # chunk size
LAYERS, HEADS, DIM, SLOTS = 2, 2, 8, 256


gen = torch.Generator().manual_seed(0)
POOL = [(torch.randn(SLOTS, HEADS, DIM, generator=gen), torch.randn(SLOTS, HEADS, DIM, generator=gen))
        for _ in range(LAYERS)]  # per layer (K, V), each [slots, H, D], as SGLang's MHA pool


@pytest.fixture
def link():
    kvcache = SimpleNamespace(start_layer=0, layer_num=LAYERS, get_kv_buffer=lambda i: POOL[i])
    device_kv = DeviceKV(kvcache)
    fp = fingerprint("fake-model", device_kv, tp_rank=0, tp_size=1)
    layout = ChunkLayout(fp, C)
    config = CacheConfig(chunk_size=C, max_local_cpu_size=64 * layout.chunk_bytes / 2**30, local_disk=None)
    store = TieredStore(config, layout)
    yield TierLink(store, device_kv, fp)
    store.close()


def expected(slots: torch.Tensor) -> torch.Tensor:
    """The pool's KV at ``slots`` in the canonical layout [L, 2, T, H, D]."""
    return torch.stack([torch.stack([k[slots], v[slots]]) for k, v in POOL])


def path(num_tokens: int, seed: int = 1):
    rnd = np.random.default_rng(seed)
    tokens = rnd.integers(0, 1000, num_tokens).astype(np.int64)
    slots = torch.from_numpy(rnd.permutation(SLOTS)[:num_tokens].astype(np.int64))
    return tokens, slots


def test_evicted_leaf_saves_only_the_chunks_it_completes(link):
    """A leaf covering [24, 56) completes chunks 1 and 2 ([16, 32), [32, 48)); chunk 0 belongs to an ancestor."""
    tokens, slots = path(56)
    assert link.save_completed_chunks(tokens, slots, node_start=24) == 2
    assert link.plan(tokens, device_len=0) is None  # chunk 0 missing: no leading hit
    plan = link.plan(tokens, device_len=16)
    assert (plan.first_chunk, plan.hit_end) == (1, 48)
    assert link.save_completed_chunks(tokens, slots, node_start=24) == 0  # already stored


def test_load_returns_exactly_the_tokens_past_the_device_match(link):
    """With 20 tokens on the device, a load returns tokens [20, 48) bit for bit."""
    tokens, slots = path(50)
    link.save_completed_chunks(tokens, slots, node_start=0)
    plan = link.plan(tokens, device_len=20)
    assert (plan.first_chunk, plan.device_len, plan.hit_end) == (1, 20, 48)
    loaded = link.load(plan)
    assert loaded.kv.shape == (LAYERS, 2, 28, HEADS, DIM)
    assert torch.equal(loaded.kv, expected(slots[20:48]))
    assert (loaded.host_tokens, loaded.disk_tokens) == (28, 0)


def test_nothing_to_plan_past_the_device_match(link):
    """A device match that already covers the stored chunks plans no load."""
    tokens, slots = path(40)
    link.save_completed_chunks(tokens, slots, node_start=0)
    assert link.plan(tokens, device_len=32) is None
    assert link.plan(tokens[:15], device_len=0) is None  # no full chunk at all


def test_a_chunk_lost_between_plan_and_load_is_a_miss(link):
    """If a planned chunk disappears, the load is all-or-nothing: None, and counted."""
    tokens, slots = path(48)
    link.save_completed_chunks(tokens, slots, node_start=0)
    plan = link.plan(tokens, device_len=0)
    link.store.remove(plan.keys[1])
    assert link.load(plan) is None
    assert link.counters.load_failures == 1


def test_split_by_tier_counts_only_loaded_tokens():
    """Tokens of the first chunk that are already on the device count for no tier."""
    spans = [(0, 16), (16, 32), (32, 48)]
    assert _split_by_tier(spans, [Tier.HOST, Tier.DISK, Tier.DISK], device_len=8) == (8, 32)


def test_a_load_from_mid_chunk_scatters_into_the_pool(link):
    """Regression: a device match ending inside a chunk (20 of 16+16) yields KV the kernel accepts."""
    tokens, slots = path(50, seed=3)
    link.save_completed_chunks(tokens, slots, node_start=0)
    loaded = link.load(link.plan(tokens, device_len=20))
    fresh = torch.arange(SLOTS - 28, SLOTS)  # [28] new device slots
    saved = [(k.clone(), v.clone()) for k, v in POOL]
    want = expected(slots[20:48])
    try:
        link.device_kv.scatter(fresh, loaded.kv)
        assert torch.equal(expected(fresh), want)
    finally:
        for (k, v), (k0, v0) in zip(POOL, saved):
            k.copy_(k0)
            v.copy_(v0)


class RecordingAgreement(RankAgreement):
    """Stands in for the TP peers: records what this rank proposes, answers the peers' MIN."""

    def __init__(self, peer_hit_end: int) -> None:
        super().__init__()
        self.peer_hit_end = peer_hit_end
        self.proposed: list[int] = []

    def min(self, value: int) -> int:
        self.proposed.append(value)
        return min(value, self.peer_hit_end)


def test_plan_joins_the_rank_agreement_even_on_a_local_miss(link):
    """The collective depends on the token ids only: a local miss proposes 0, a short prompt never calls."""
    tokens, slots = path(64, seed=4)
    link.save_completed_chunks(tokens, slots, node_start=0)
    link.agree = RecordingAgreement(peer_hit_end=32)
    plan = link.plan(tokens, device_len=0)
    assert (plan.hit_end, len(plan.keys)) == (32, 2)  # the peer has 2 chunks, this rank 4
    assert link.plan(path(64, seed=5)[0], device_len=0) is None  # nothing stored for these tokens
    assert link.plan(tokens[:C - 1], device_len=0) is None  # no full chunk: no collective
    assert link.agree.proposed == [64, 0]
