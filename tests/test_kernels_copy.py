"""Gather/scatter kernels against a naive per-layout oracle, on CPU.

The Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1); the torch
reference runs as is. Both must equal an oracle written directly from each
engine's indexing rule, bit for bit, on every layout and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from lmcache_sgl.triton_kernels import PoolView, gather, scatter, sglang_mha_pool, sglang_mla_pool, vllm_pool
from lmcache_sgl.triton_kernels._triton_compat import HAVE_TRITON, is_interpreted
from lmcache_sgl.triton_kernels.paged_copy import _paged_copy_kernel, tile_shape
from lmcache_sgl.triton_kernels.pools import RAW_DTYPES

# Tiny dims keep the interpreter fast. With H*D = 32 a 16-bit program holds
# 256 tokens, so T = 255, 256, 257 straddle a token-block edge.
L, H, D, MLA_DIM, VLLM_BS = 2, 2, 16, 24, 16
DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn]
# A NaN bit pattern in every tested dtype: random normal data never produces it.
SENTINEL = {1: 0x7F, 2: 0x7FFF}

INTERPRETED = HAVE_TRITON and is_interpreted(_paged_copy_kernel)
BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 and triton")),
    "torch",
]


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(RAW_DTYPES[t.dtype.itemsize])


def fill_random(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random normal values (never all zeros), written through any strides."""
    raw(t).copy_(raw(torch.randn(t.shape, generator=gen).to(t.dtype)))
    return t


def poison(t: torch.Tensor) -> torch.Tensor:
    raw(t).fill_(SENTINEL[t.dtype.itemsize])
    return t


@dataclass(frozen=True)
class Engine:
    """One engine pool layout: how to allocate it, view it, and index it naively."""

    name: str
    page: int  # slots come in runs of this length (the engine's page size)
    alloc: Callable[..., list[torch.Tensor]]  # (num_slots, dtype, device="cpu") -> engine tensors
    view: Callable[[list[torch.Tensor]], PoolView]
    oracle_gather: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]  # -> raw [L, P, T, H, D]
    oracle_scatter: Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], None]


def _mha_alloc(num_slots, dtype, device="cpu"):
    return [torch.empty(num_slots, H, D, dtype=dtype, device=device) for _ in range(2 * L)]  # k0, v0, k1, v1, ...


def _mha_gather(ts, slots):
    return torch.stack([raw(t)[slots] for t in ts]).view(L, 2, len(slots), H, D)


def _mha_scatter(ts, slots, chunk):
    for t, plane in zip(ts, raw(chunk).view(2 * L, len(slots), H, D)):
        raw(t)[slots] = plane


def _mla_alloc(num_slots, dtype, device="cpu"):
    return [torch.empty(num_slots, 1, MLA_DIM, dtype=dtype, device=device) for _ in range(L)]


def _mla_gather(ts, slots):
    return torch.stack([raw(t)[slots] for t in ts]).view(L, 1, len(slots), 1, MLA_DIM)


def _mla_scatter(ts, slots, chunk):
    for t, plane in zip(ts, raw(chunk).view(L, len(slots), 1, MLA_DIM)):
        raw(t)[slots] = plane


def _vllm_alloc(order):
    def alloc(num_slots, dtype, device="cpu"):
        nb, kw = num_slots // VLLM_BS, dict(dtype=dtype, device=device)
        if order == "blocks_major":  # memory [NB, bs, H, 2D] (vLLM's NHD)
            return [torch.empty(nb, VLLM_BS, H, 2 * D, **kw).permute(0, 2, 1, 3) for _ in range(L)]
        if order == "heads_major":  # memory [H, NB, bs, 2D]
            return [torch.empty(H, nb, VLLM_BS, 2 * D, **kw).permute(1, 0, 2, 3) for _ in range(L)]
        return [torch.empty(nb, H, VLLM_BS, 2 * D, **kw) for _ in range(L)]  # contiguous (HND)
    return alloc


def _vllm_gather(ts, slots):
    rows = [raw(t)[slots // VLLM_BS, :, slots % VLLM_BS] for t in ts]  # [T, H, 2D] each
    return torch.stack([torch.stack([r[..., :D], r[..., D:]]) for r in rows])  # [L, 2, T, H, D]


def _vllm_scatter(ts, slots, chunk):
    for t, planes in zip(ts, raw(chunk)):
        raw(t)[slots // VLLM_BS, :, slots % VLLM_BS, :D] = planes[0]
        raw(t)[slots // VLLM_BS, :, slots % VLLM_BS, D:] = planes[1]


def _mha_view(ts):
    return sglang_mha_pool(ts[0::2], ts[1::2])


ENGINES = {e.name: e for e in [
    Engine("sglang_mha_page1", 1, _mha_alloc, _mha_view, _mha_gather, _mha_scatter),
    Engine("sglang_mha_page16", 16, _mha_alloc, _mha_view, _mha_gather, _mha_scatter),
    Engine("sglang_mha_page64", 64, _mha_alloc, _mha_view, _mha_gather, _mha_scatter),
    Engine("sglang_mla", 1, _mla_alloc, sglang_mla_pool, _mla_gather, _mla_scatter),
    Engine("vllm_contiguous", VLLM_BS, _vllm_alloc("contiguous"), vllm_pool, _vllm_gather, _vllm_scatter),
    Engine("vllm_blocks_major", VLLM_BS, _vllm_alloc("blocks_major"), vllm_pool, _vllm_gather, _vllm_scatter),
    Engine("vllm_heads_major", VLLM_BS, _vllm_alloc("heads_major"), vllm_pool, _vllm_gather, _vllm_scatter),
]}


def pool_slots(num_tokens: int) -> int:
    """A pool twice the tokens, a whole number of 64-slot pages."""
    return max(256, -(-2 * num_tokens // 64) * 64)


def pick_slots(engine: Engine, num_slots: int, num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct slots in random order, in runs of ``engine.page`` (the last run may be partial)."""
    pages = torch.randperm(num_slots // engine.page, generator=gen)[: -(-num_tokens // engine.page)]
    return (pages[:, None] * engine.page + torch.arange(engine.page)).flatten()[:num_tokens]  # [T] int64


def setup(engine: Engine, dtype: torch.dtype, num_tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_slots = pool_slots(num_tokens)
    tensors = [fill_random(t, gen) for t in engine.alloc(num_slots, dtype)]
    return tensors, engine.view(tensors), pick_slots(engine, num_slots, num_tokens, gen), gen


def check_gather(engine, dtype, num_tokens, backend):
    tensors, pool, slots, _ = setup(engine, dtype, num_tokens)
    out = poison(pool.empty_chunk(num_tokens))
    gather(pool, slots, out, backend=backend)
    assert not (raw(out) == SENTINEL[dtype.itemsize]).any(), "some chunk elements were never written"
    assert torch.equal(raw(out), engine.oracle_gather(tensors, slots))


def check_scatter(engine, dtype, num_tokens, backend):
    """Scatter into a poisoned pool: the target slots get the chunk, everything else keeps the sentinel."""
    gen = torch.Generator().manual_seed(1)
    num_slots = pool_slots(num_tokens)
    tensors = [poison(t) for t in engine.alloc(num_slots, dtype)]
    expected = [poison(t) for t in engine.alloc(num_slots, dtype)]
    pool, slots = engine.view(tensors), pick_slots(engine, num_slots, num_tokens, gen)
    chunk = fill_random(pool.empty_chunk(num_tokens), gen)  # [L, P, T, H, D]
    scatter(pool, slots, chunk, backend=backend)
    engine.oracle_scatter(expected, slots, chunk)
    for got, want in zip(tensors, expected):
        assert torch.equal(raw(got), raw(want))


def test_test_dims_hit_a_token_block_edge():
    """The tail sizes below mean what they say: a 16-bit program holds 256 tokens of [H, D]."""
    assert tile_shape(H, D, 2)[0] == 256
    assert tile_shape(1, MLA_DIM, 2)[0] == 256


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens", [7, 257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("engine", ENGINES)
def test_gather_matches_oracle(engine, dtype, num_tokens, backend):
    """Gather writes every chunk element, equal to the engine's own indexing."""
    check_gather(ENGINES[engine], dtype, num_tokens, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens", [7, 257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("engine", ENGINES)
def test_scatter_matches_oracle(engine, dtype, num_tokens, backend):
    """Scatter writes exactly the target slots of every layer and plane."""
    check_scatter(ENGINES[engine], dtype, num_tokens, backend)


TAILS = [("sglang_mha_page1", torch.bfloat16, n) for n in (1, 255, 256, 4099)] + [
    ("vllm_blocks_major", torch.float16, n) for n in (1, 255, 256, 4099)] + [
    ("sglang_mla", torch.bfloat16, 4099), ("vllm_contiguous", torch.float8_e4m3fn, 4099)]


@pytest.mark.parametrize("engine,dtype,num_tokens", TAILS, ids=[f"{e}-{str(d)[6:]}-{n}" for e, d, n in TAILS])
def test_tail_token_counts_triton(engine, dtype, num_tokens):
    """Token counts around and far past a token-block edge, gather and scatter."""
    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 and triton")
    check_gather(ENGINES[engine], dtype, num_tokens, "triton")
    check_scatter(ENGINES[engine], dtype, num_tokens, "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("engine", ["sglang_mha_page16", "sglang_mla", "vllm_blocks_major"])
def test_round_trip_into_fresh_pool(engine, backend):
    """gather -> scatter into a fresh pool at other slots reproduces the original KV there."""
    eng = ENGINES[engine]
    tensors, pool, slots, gen = setup(eng, torch.bfloat16, 100)
    fresh = [poison(t) for t in eng.alloc(pool.num_slots, torch.bfloat16)]
    new_slots = pick_slots(eng, pool.num_slots, 100, gen)
    scatter(eng.view(fresh), new_slots, gather(pool, slots, backend=backend), backend=backend)
    assert torch.equal(eng.oracle_gather(fresh, new_slots), eng.oracle_gather(tensors, slots))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_moves_between_engines(backend):
    """A chunk gathered from SGLang's pool scatters into vLLM's and gathers back unchanged."""
    tensors, sgl, slots, gen = setup(ENGINES["sglang_mha_page1"], torch.bfloat16, 50)
    chunk = gather(sgl, slots, backend=backend)  # [L, 2, T, H, D]
    vllm_tensors = [poison(t) for t in _vllm_alloc("blocks_major")(256, torch.bfloat16)]
    vslots = pick_slots(ENGINES["vllm_blocks_major"], 256, 50, gen)
    scatter(vllm_pool(vllm_tensors), vslots, chunk, backend=backend)
    assert torch.equal(_vllm_gather(vllm_tensors, vslots), _mha_gather(tensors, slots))


@pytest.mark.parametrize("heads,head_dim", [(3, 24), (1, 8), (5, 40)])
def test_odd_head_shapes_triton(heads, head_dim):
    """Heads and head dims that are not powers of 2 exercise the head and dim masks."""
    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 and triton")
    gen = torch.Generator().manual_seed(heads)
    layers = [fill_random(torch.empty(8, heads, VLLM_BS, 2 * head_dim), gen).to(torch.bfloat16) for _ in range(L)]
    pool, slots = vllm_pool(layers), torch.randperm(8 * VLLM_BS, generator=gen)[:70]
    got = gather(pool, slots, poison(pool.empty_chunk(70)), backend="triton")
    assert torch.equal(raw(got), raw(gather(pool, slots, backend="torch")))
    fresh = [poison(torch.empty_like(t)) for t in layers]
    scatter(vllm_pool(fresh), slots, got, backend="triton")
    assert torch.equal(raw(gather(vllm_pool(fresh), slots, backend="torch")), raw(got))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens_is_a_no_op(backend):
    """An empty slot list gathers an empty chunk and scatters nothing."""
    tensors, pool, _, _ = setup(ENGINES["sglang_mha_page1"], torch.bfloat16, 4)
    before = [t.clone() for t in tensors]
    empty = torch.empty(0, dtype=torch.int64)
    assert gather(pool, empty, backend=backend).shape == (L, 2, 0, H, D)
    scatter(pool, empty, pool.empty_chunk(0), backend=backend)
    assert all(torch.equal(raw(a), raw(b)) for a, b in zip(before, tensors))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_slots(backend):
    """int32 slot tensors (as engines often hold them) give the same result as int64."""
    tensors, pool, slots, _ = setup(ENGINES["vllm_contiguous"], torch.float16, 40)
    got = gather(pool, slots.to(torch.int32), backend=backend)
    assert torch.equal(raw(got), _vllm_gather(tensors, slots))


COMPILED_CUDA = torch.cuda.is_available() and HAVE_TRITON and not INTERPRETED


@pytest.mark.gpu
@pytest.mark.skipif(not COMPILED_CUDA, reason="needs CUDA and compiled Triton (TRITON_INTERPRET unset)")
@pytest.mark.parametrize("host", [False, True], ids=["device_chunk", "pinned_host_chunk"])
@pytest.mark.parametrize("engine", ["sglang_mha_page16", "sglang_mla", "vllm_blocks_major", "vllm_heads_major"])
def test_cuda_kernel_matches_oracle(engine, host):
    """The compiled kernel on a CUDA pool, with the chunk on the GPU or in pinned host memory (zero-copy)."""
    eng, num_tokens, dtype = ENGINES[engine], 4099, torch.bfloat16
    tensors, cpu_pool, slots, _ = setup(eng, dtype, num_tokens)
    on_gpu = eng.alloc(cpu_pool.num_slots, dtype, "cuda")
    for g, c in zip(on_gpu, tensors):
        g.copy_(c)
    chunk = poison(eng.view(on_gpu).empty_chunk(num_tokens, device="cpu" if host else None, pin_memory=host))
    gather(eng.view(on_gpu), slots.cuda(), chunk, backend="triton")
    torch.cuda.synchronize()
    assert torch.equal(raw(chunk).cpu(), eng.oracle_gather(tensors, slots))
    fresh = [poison(t) for t in eng.alloc(cpu_pool.num_slots, dtype, "cuda")]
    expected = [poison(t) for t in eng.alloc(cpu_pool.num_slots, dtype)]
    scatter(eng.view(fresh), slots.cuda(), chunk, backend="triton")
    eng.oracle_scatter(expected, slots, chunk.cpu())
    torch.cuda.synchronize()
    assert all(torch.equal(raw(f).cpu(), raw(e)) for f, e in zip(fresh, expected))
