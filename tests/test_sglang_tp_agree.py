"""TP ranks agree on store hits (issue 10, item 2): two real CPU ranks over gloo.

Each rank runs in its own process with its own store, as SGLang's TP
schedulers do, and builds the real ``TieredRadixCache`` through our factory
with a gloo group as ``tp_cache_group`` (SGLang passes its TP CPU group).
The ranks' stores differ on purpose; what they report and load must not.
"""

from __future__ import annotations

import json
import time
from array import array
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import require

require("sglang")

C = 16  # chunk size = tokens per chunk
LAYERS, HEADS, DIM, SLOTS = 2, 2, 8, 512
PROMPT = np.arange(1000, 1000 + 5 * C, dtype=np.int64)  # 5 full chunks
JOIN_TIMEOUT_S = 240  # both ranks import sglang on a 2-core machine


def build_cache(rank: int, world: int, group, config_file: Path, runner=None):
    """A real TieredRadixCache on a CPU MHA pool, built by ``build_tiered_radix_cache`` as a scheduler does."""
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    from sglang.srt.mem_cache import registry

    from lmcache_sgl.adapters.sglang.factory import build_tiered_radix_cache

    # The only runtime-context reads on this path; a launched server publishes them (defaults here).
    registry.get_disagg = lambda: SimpleNamespace(disaggregation_decode_retraction_backup=None)
    registry.get_memory = lambda: SimpleNamespace(enable_unified_cache_external_linker=False)
    kv = MHATokenToKVPool(size=SLOTS, page_size=1, dtype=torch.float32, head_num=HEADS, head_dim=DIM,
                          layer_num=LAYERS, device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(SLOTS, torch.float32, "cpu", kv, need_sort=False)
    req_pool = ReqToTokenPool(size=8, max_context_len=1024, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator,
                             page_size=1, tp_cache_group=group)
    ctx = SimpleNamespace(
        server_args=SimpleNamespace(lmcache_config_file=str(config_file), model_path="/models/tiny-tp-llama"),
        params=params, is_hybrid_swa=False, is_hybrid_ssm=False, enable_hierarchical_cache=False,
        disable_radix_cache=False, tp_worker=SimpleNamespace(model_runner=runner or SimpleNamespace(
            forward=lambda forward_batch, *a, **k: None)), tp_rank=rank, tp_size=world)
    return build_tiered_radix_cache(ctx)


def chunk_kv(rank: int, i: int) -> torch.Tensor:
    """Chunk i's KV on ``rank`` [L, 2, C, H, D]: distinct per rank and chunk, never zero."""
    g = torch.Generator().manual_seed(100 * rank + i)
    return torch.randn(LAYERS, 2, C, HEADS, DIM, generator=g) + 1.0


def put_chunks(cache, rank: int, tokens: np.ndarray, chunks: range) -> None:
    from lmcache_sgl import prefix_keys

    keys = prefix_keys(cache.link.fingerprint, tokens[:len(tokens) // C * C], C)
    for i in chunks:
        assert cache.link.store.put(keys[i], tokens[i * C:(i + 1) * C], chunk_kv(rank, i), start_pos=i * C)


def new_req(rid: str):
    return SimpleNamespace(rid=rid, extra_key=None, cache_salt=None, session=None, priority=0)


def match(cache, req, tokens: np.ndarray):
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    result = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens.tolist())), req=req))
    req.prefix_len, req.last_node = result.device_prefix_len, result.last_device_node
    return result


def load_back(cache, req, result):
    from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams

    return cache.init_load_back(InitLoadBackParams(best_match_node=result.best_match_node,
                                                   host_hit_length=result.host_hit_length, req=req))


def device_kv_matches(cache, rank: int, node, chunks: range) -> bool:
    slots = cache.path_device_indices(node)
    got = cache.link.device_kv.gather(slots[chunks.start * C:chunks.stop * C])
    want = torch.cat([chunk_kv(rank, i) for i in chunks], dim=2)
    return torch.equal(got, want)


def scenario(rank: int, world: int, workdir: str) -> None:
    """Rank 0 stores chunks 0-3 of PROMPT, rank 1 only 0-1; then one rank loses a chunk of a second prompt."""
    work = Path(workdir)
    dist.init_process_group("gloo", init_method=f"file://{work / 'rendezvous'}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    group = dist.new_group(backend="gloo")
    cache = build_cache(rank, world, group, work / "config.yaml")
    out = {}

    put_chunks(cache, rank, PROMPT, range(4) if rank == 0 else range(2))
    req = new_req("shared")
    first = match(cache, req, PROMPT)
    out["host_hit"] = first.host_hit_length
    loaded, last = load_back(cache, req, first)
    out["loaded"] = loaded
    out["kv_ok"] = device_kv_matches(cache, rank, last, range(2))

    second_prompt = PROMPT + 7
    put_chunks(cache, rank, second_prompt, range(3))
    req2 = new_req("lost-on-rank-1")
    second = match(cache, req2, second_prompt)
    out["host_hit_2"] = second.host_hit_length
    if rank == 1:  # this rank cannot stage the load (no device slots for it)
        cache._alloc_device = lambda num_tokens: None
    free_before = cache.token_to_kv_pool_allocator.available_size()
    loaded2, last2 = load_back(cache, req2, second)
    out["loaded_2"] = loaded2
    out["last_unchanged_2"] = last2 == req2.last_node
    out["slots_leaked_2"] = free_before - cache.token_to_kv_pool_allocator.available_size()
    (work / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def run_ranks(fn, workdir: Path, world: int = 2) -> list[dict]:
    ctx = mp.start_processes(fn, args=(world, str(workdir)), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} ranks did not finish in {JOIN_TIMEOUT_S} s (a collective hang?)")
    return [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    work = tmp_path_factory.mktemp("tp2")
    (work / "config.yaml").write_text(f"chunk_size: {C}\nmax_local_cpu_size: 0.01\nload_policy: always\n")
    return run_ranks(_scenario_entry, work)


def _scenario_entry(rank: int, world: int, workdir: str) -> None:
    scenario(rank, world, workdir)


def test_ranks_report_the_shortest_store_hit(ranks):
    """Rank 0 holds chunks 0-3, rank 1 holds 0-1: both promise 2 chunks, so both build the same batch."""
    assert [r["host_hit"] for r in ranks] == [2 * C, 2 * C]


def test_agreed_hits_load_each_ranks_own_kv(ranks):
    """Both ranks load the 2 agreed chunks, each from its own store, bit for bit."""
    assert [r["loaded"] for r in ranks] == [2 * C, 2 * C]
    assert [r["kv_ok"] for r in ranks] == [True, True]


def test_a_load_failure_on_one_rank_is_a_miss_on_every_rank(ranks):
    """Rank 1 cannot stage its load (no device slots): neither rank loads, and rank 0 frees what it staged."""
    assert [r["host_hit_2"] for r in ranks] == [3 * C, 3 * C]
    assert [r["loaded_2"] for r in ranks] == [0, 0]
    assert [r["last_unchanged_2"] for r in ranks] == [True, True]
    assert [r["slots_leaked_2"] for r in ranks] == [0, 0]


def test_a_single_rank_agrees_with_itself_without_a_collective():
    """TP size 1 (no group, or a group of one) never calls into torch.distributed."""
    from lmcache_sgl.adapters.sglang.tp_agree import RankAgreement

    params = SimpleNamespace(tp_cache_group=None, attn_cp_cache_group=None, attn_tp_cache_group=None)
    agree = RankAgreement.for_cache(params)
    assert agree.is_single_rank
    assert agree.min(48) == 48
