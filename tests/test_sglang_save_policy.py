"""save_policy under SGLang: when a prefilled path's chunks reach the store, and that copies hold their slots.

In-process: the real TieredRadixCache on a CPU MHA pool. A "prefill" writes
known KV into freshly allocated pool slots and inserts them, as
``cache_finished_req`` does; the write-through worker is the real one.
"""

from __future__ import annotations

import threading
from array import array

import numpy as np
import pytest
import torch

from conftest import require

require("sglang")

from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402

from lmcache_sgl import prefix_keys  # noqa: E402
from lmcache_sgl.adapters.sglang.backups import Backup, BackupQueue  # noqa: E402
from lmcache_sgl.config import CacheConfig, ConfigError  # noqa: E402
from sglang_cpu_cache import build_cpu_tiered_cache  # noqa: E402

C = 16
LAYERS, HEADS, DIM, SLOTS = 2, 2, 8, 256
NUM_CHUNKS = 2
TOKENS = NUM_CHUNKS * C + 5  # two full chunks and a partial tail


@pytest.fixture
def make_cache(tmp_path, monkeypatch):
    caches = []

    def make(policy: str):
        config = tmp_path / f"{policy}.yaml"
        config.write_text(f"chunk_size: {C}\nmax_local_cpu_size: 0.01\nsave_policy: {policy}\n"
                          "shutdown_flush_timeout_s: 5\n")
        cache = build_cpu_tiered_cache(config, monkeypatch, model_path="/models/tiny-save-policy",
                                       layers=LAYERS, heads=HEADS, dim=DIM, slots=SLOTS)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.backups.close()
        cache.link.store.close()


def prompt(seed: int) -> tuple[np.ndarray, torch.Tensor]:
    rnd = np.random.default_rng(seed)
    tokens = rnd.integers(0, 1000, TOKENS).astype(np.int64)
    kv = torch.from_numpy(rnd.standard_normal((LAYERS, 2, TOKENS, HEADS, DIM)).astype(np.float32)) + 3.0
    return tokens, kv


def prefill(cache, tokens: np.ndarray, kv: torch.Tensor) -> torch.Tensor:
    """Write ``kv`` into new device slots and insert the path, as a finished request does; its slots."""
    slots = cache.token_to_kv_pool_allocator.alloc(len(tokens))
    cache.link.device_kv.scatter(slots, kv)
    cache.insert(InsertParams(key=RadixKey(array("q", tokens.tolist())), value=slots))
    return slots


def reuse(cache, tokens: np.ndarray) -> None:
    """A second request with the same prompt finishes: its insert walks the cached path (no new slots)."""
    key = RadixKey(array("q", tokens.tolist()))
    slots = cache.path_device_indices(cache.match_prefix(MatchPrefixParams(key=key)).last_device_node)
    cache.insert(InsertParams(key=RadixKey(array("q", tokens.tolist())), value=slots.clone()))


def stored(cache, tokens: np.ndarray) -> list[bool]:
    keys = prefix_keys(cache.link.fingerprint, tokens[:NUM_CHUNKS * C], C)
    return [cache.link.store.contains(k) is not None for k in keys]


def settle(cache) -> None:
    assert cache.backups.wait_finished(10)
    cache.check_hicache_events()
    assert cache.backups.unreleased() == 0


def stored_kv(cache, tokens: np.ndarray) -> torch.Tensor:
    keys = prefix_keys(cache.link.fingerprint, tokens[:NUM_CHUNKS * C], C)
    chunks = cache.link.store.get(keys, [tokens[i * C:(i + 1) * C] for i in range(NUM_CHUNKS)])
    return torch.cat(chunks, dim=2)


def test_save_policy_defaults_to_write_through_and_a_bad_name_lists_the_choices():
    """The default is write_through; an unknown name is a ConfigError naming the key and the three policies."""
    assert CacheConfig().save_policy == "write_through"
    with pytest.raises(ConfigError, match=r"save_policy='write_around'.*write_through.*write_back"
                                          r".*write_through_selective"):
        CacheConfig(save_policy="write_around")


def test_write_through_saves_after_the_first_prefill(make_cache):
    """write_through: the full chunks are in the store after one prefill, with no eviction, exact KV."""
    cache = make_cache("write_through")
    tokens, kv = prompt(1)
    prefill(cache, tokens, kv)
    settle(cache)
    assert stored(cache, tokens) == [True, True]
    assert torch.equal(stored_kv(cache, tokens), kv[:, :, :NUM_CHUNKS * C])
    assert cache.evictable_size() == TOKENS  # the copy's lock is gone: the whole path may be evicted


def test_write_through_selective_saves_on_the_second_hit(make_cache):
    """write_through_selective: nothing after the first prefill; the second request's insert saves it."""
    cache = make_cache("write_through_selective")
    tokens, kv = prompt(2)
    prefill(cache, tokens, kv)
    settle(cache)
    assert stored(cache, tokens) == [False, False]
    reuse(cache, tokens)
    settle(cache)
    assert stored(cache, tokens) == [True, True]
    assert torch.equal(stored_kv(cache, tokens), kv[:, :, :NUM_CHUNKS * C])


def test_write_back_saves_only_on_eviction(make_cache):
    """write_back: prefills and reuses leave the store empty; evicting the path saves its full chunks."""
    cache = make_cache("write_back")
    tokens, kv = prompt(3)
    prefill(cache, tokens, kv)
    reuse(cache, tokens)
    settle(cache)
    assert stored(cache, tokens) == [False, False]
    cache.evict(EvictParams(num_tokens=TOKENS))
    assert stored(cache, tokens) == [True, True]
    assert torch.equal(stored_kv(cache, tokens), kv[:, :, :NUM_CHUNKS * C])


def hold_copies(cache, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make the write-through worker stop inside its device gather: (gate to let it go on, entered)."""
    gate, entered = threading.Event(), threading.Event()
    real_gather = cache.link.device_kv.gather

    def held_gather(slots):
        entered.set()
        assert gate.wait(30), "the test never let the copy go on"
        return real_gather(slots)

    monkeypatch.setattr(cache.link.device_kv, "gather", held_gather)
    return gate, entered


def test_eviction_cannot_free_slots_while_their_copy_runs(make_cache, monkeypatch):
    """A write-through copy held mid-way: eviction frees none of its slots until the copy is done and released."""
    cache = make_cache("write_through")
    allocator = cache.token_to_kv_pool_allocator
    gate, entered = hold_copies(cache, monkeypatch)
    tokens, kv = prompt(4)
    free_before = allocator.available_size()
    slots = prefill(cache, tokens, kv)
    assert entered.wait(10)  # the worker is inside the copy
    cache.evict(EvictParams(num_tokens=TOKENS))
    assert allocator.available_size() == free_before - TOKENS  # nothing freed: the path is locked
    assert cache.evictable_size() == 0
    gate.set()
    assert cache.backups.wait_finished(10)
    cache.evict(EvictParams(num_tokens=TOKENS))  # done, but not yet released (a step boundary does that)
    assert allocator.available_size() == free_before - TOKENS
    cache.check_hicache_events()
    cache.evict(EvictParams(num_tokens=TOKENS))
    assert allocator.available_size() == free_before
    assert torch.equal(stored_kv(cache, tokens), kv[:, :, :NUM_CHUNKS * C])
    assert slots.numel() == TOKENS


def test_flush_cache_waits_for_running_copies_then_saves_the_tree(make_cache):
    """/flush_cache (reset) with a backup queued: no lock is left, and the chunks are in the store."""
    cache = make_cache("write_through")
    tokens, kv = prompt(5)
    prefill(cache, tokens, kv)
    cache.reset()
    assert cache.backups.unreleased() == 0 and cache.evictable_size() == 0 and cache.protected_size() == 0
    assert stored(cache, tokens) == [True, True]


def test_a_discarded_backup_never_puts_and_a_full_queue_refuses():
    """Backups discarded while copying see still_valid() False; submit refuses beyond max_jobs."""
    gate, seen = threading.Event(), []

    def save(job, still_valid):
        assert gate.wait(30)
        seen.append((job.chunks, still_valid()))

    backups = BackupQueue(save, max_jobs=2)
    job = Backup(np.arange(C, dtype=np.int64), torch.arange(C), (0,), lock=None)
    assert backups.submit(job) and backups.submit(job._replace(chunks=(1,)))
    assert not backups.submit(job._replace(chunks=(2,)))  # full: left to eviction
    assert backups.finished() == 0
    with pytest.raises(ValueError, match="only 0 leading backups"):
        backups.release(1)
    assert [j.chunks for j in backups.discard()] == [(0,), (1,)]
    gate.set()
    backups.close(timeout_s=10)
    assert seen == [((0,), False), ((1,), False)]


def test_finished_copies_do_not_keep_flush_cache_waiting(make_cache, monkeypatch):
    """SGLang's /flush_cache asks for idleness before its step releases finished copies:
    only a copy still running counts as pending, and reset() unlocks the finished ones."""
    cache = make_cache("write_through")
    gate, entered = hold_copies(cache, monkeypatch)
    tokens, kv = prompt(6)
    prefill(cache, tokens, kv)
    assert entered.wait(10)
    assert cache.has_pending_cache_operations()  # the copy runs: /flush_cache must wait
    gate.set()
    assert cache.backups.wait_finished(10)
    assert cache.backups.unreleased() > 0  # finished, not yet released by a scheduler step
    assert not cache.has_pending_cache_operations()
    cache.reset()
    assert cache.backups.unreleased() == 0
    assert torch.equal(stored_kv(cache, tokens), kv[:, :, :NUM_CHUNKS * C])
