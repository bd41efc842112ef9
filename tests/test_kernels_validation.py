"""Bad input to the copy kernels raises ValueError naming the bad value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from lmcache_sgl.triton_kernels import dispatch, gather, resolve_backend, scatter
from lmcache_sgl.triton_kernels import sglang_mha_pool, sglang_mla_pool, vllm_pool
from lmcache_sgl.triton_kernels._triton_compat import HAVE_TRITON, is_interpreted
from lmcache_sgl.triton_kernels.paged_copy import _paged_copy_kernel

SLOTS, H, D = 64, 2, 16
INTERPRETED = HAVE_TRITON and is_interpreted(_paged_copy_kernel)
BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 and triton")),
    "torch",
]


def mha_pool(dtype=torch.bfloat16, layers=2):
    return sglang_mha_pool([torch.randn(SLOTS, H, D).to(dtype) for _ in range(layers)],
                           [torch.randn(SLOTS, H, D).to(dtype) for _ in range(layers)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [SLOTS, -1, 10 * SLOTS])
def test_out_of_range_slot(backend, bad):
    """A slot outside [0, num_slots) is refused before any copy, gather and scatter alike."""
    pool = mha_pool()
    slots = torch.tensor([0, bad, 3])
    with pytest.raises(ValueError, match=rf"slot {bad} is out of range; allowed: \[0, {SLOTS}\)"):
        gather(pool, slots, backend=backend)
    with pytest.raises(ValueError, match=rf"slot {bad} is out of range"):
        scatter(pool, slots, pool.empty_chunk(3), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_chunk_dtype(backend):
    """The chunk dtype must equal the pool's; bits are never reinterpreted across dtypes."""
    pool = mha_pool(torch.bfloat16)
    chunk = torch.zeros(pool.chunk_shape(2), dtype=torch.float16)
    with pytest.raises(ValueError, match="chunk dtype torch.float16 does not match the pool dtype torch.bfloat16"):
        gather(pool, torch.tensor([1, 2]), chunk, backend=backend)
    with pytest.raises(ValueError, match="chunk dtype"):
        scatter(pool, torch.tensor([1, 2]), chunk, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 2, 3, H, D), (2, 1, 2, H, D), (2, 2, 2, H, D + 1), (2, 2, 2, H * D)])
def test_wrong_chunk_shape(backend, shape):
    """The chunk must be exactly [L, P, T, H, D] for the T slots given."""
    pool = mha_pool()
    chunk = torch.zeros(shape, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"chunk shape .* is wrong; expected \[L, P, T, H, D\] = \(2, 2, 2, 2, 16\)"):
        gather(pool, torch.tensor([1, 2]), chunk, backend=backend)
    with pytest.raises(ValueError, match="chunk shape"):
        scatter(pool, torch.tensor([1, 2]), chunk, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_slot_tensors(backend):
    """Slots are a contiguous 1-D int32/int64 tensor."""
    pool = mha_pool()
    with pytest.raises(ValueError, match="slots dtype torch.float32 is not allowed; use torch.int32 or torch.int64"):
        gather(pool, torch.tensor([1.0, 2.0]), backend=backend)
    with pytest.raises(ValueError, match=r"slots must be a 1-D tensor \[T\], got \(1, 2\)"):
        gather(pool, torch.tensor([[1, 2]]), backend=backend)
    with pytest.raises(ValueError, match="slots must be a 1-D tensor"):
        gather(pool, [1, 2], backend=backend)
    with pytest.raises(ValueError, match="slots must be contiguous"):
        gather(pool, torch.arange(8)[::2], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_refuses_duplicate_slots(backend):
    """Two chunk tokens cannot land in one slot (the result would depend on timing)."""
    pool = mha_pool()
    with pytest.raises(ValueError, match="slot 5 appears more than once"):
        scatter(pool, torch.tensor([5, 1, 5]), pool.empty_chunk(3), backend=backend)
    gather(pool, torch.tensor([5, 1, 5]), backend=backend)  # duplicates are fine to read


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_chunk(backend):
    pool = mha_pool()
    chunk = torch.zeros(2, 2, H, 2, D, dtype=torch.bfloat16).transpose(2, 3)  # right shape, wrong strides
    with pytest.raises(ValueError, match="chunk must be contiguous"):
        gather(pool, torch.tensor([1, 2]), chunk, backend=backend)


def test_host_chunk_needs_cuda_pool():
    """Only a CUDA pool may use a host chunk (pinned, zero-copy); a CPU pool's chunk must be on CPU."""
    pool = mha_pool()
    chunk = torch.zeros(pool.chunk_shape(1), dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="chunk is on meta; allowed: the pool device cpu"):
        gather(pool, torch.tensor([1]), chunk, backend="torch")


def test_unsupported_pool_dtype():
    with pytest.raises(ValueError, match=r"KV dtype torch.float64 is not supported; allowed: \[torch.bfloat16"):
        sglang_mha_pool([torch.zeros(4, H, D, dtype=torch.float64)], [torch.zeros(4, H, D, dtype=torch.float64)])


def test_pool_layers_must_match():
    k = [torch.zeros(SLOTS, H, D), torch.zeros(SLOTS + 1, H, D)]
    with pytest.raises(ValueError, match="pool layers differ in shape: plane 2"):
        sglang_mha_pool(k, [torch.zeros(SLOTS, H, D)] * 2)
    with pytest.raises(ValueError, match="got 2 K layers but 1 V layers"):
        sglang_mha_pool(k, k[:1])
    v = [torch.zeros(SLOTS, H, D), torch.zeros(SLOTS, D, H).transpose(1, 2)]
    with pytest.raises(ValueError, match="pool head_dim must be contiguous"):
        sglang_mha_pool(v[1:], v[1:])


def test_pool_shapes_per_engine():
    """Each builder names the shape it expects."""
    with pytest.raises(ValueError, match=r"sglang MHA layer must be a 3-D tensor \[num_slots, heads, head_dim\]"):
        sglang_mha_pool([torch.zeros(4, D)], [torch.zeros(4, D)])
    with pytest.raises(ValueError, match="dim 1 must be 1"):
        sglang_mla_pool([torch.zeros(4, 2, D)])
    with pytest.raises(ValueError, match="vllm layer last dim 33 must be even"):
        vllm_pool([torch.zeros(2, H, 16, 33)])
    with pytest.raises(ValueError, match="no vllm layer tensors given"):
        vllm_pool([])


def test_backend_choice():
    """auto means torch on CPU; unknown names and pools are refused."""
    pool = mha_pool()
    assert resolve_backend(pool) == "torch"
    assert resolve_backend(pool, "torch") == "torch"
    with pytest.raises(ValueError, match=r"backend 'cuda' is not known; allowed: \['auto', 'triton', 'torch'\]"):
        resolve_backend(pool, "cuda")
    with pytest.raises(ValueError, match="pool must be a PoolView"):
        gather([torch.zeros(4)], torch.tensor([0]))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    """Forcing Triton on CPU tensors without TRITON_INTERPRET=1 says how to fix it."""
    monkeypatch.setattr(dispatch, "HAVE_TRITON", True)
    monkeypatch.setattr(dispatch, "is_interpreted", lambda kernel: False)
    with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
        resolve_backend(mha_pool(), "triton")
    monkeypatch.setattr(dispatch, "HAVE_TRITON", False)
    with pytest.raises(ValueError, match="needs the triton package"):
        resolve_backend(mha_pool(), "triton")


def test_pool_device_must_be_cpu_or_cuda():
    with pytest.raises(ValueError, match="pool device meta is not supported; allowed: cpu or cuda"):
        sglang_mla_pool([torch.zeros(4, 1, D, device="meta")])
