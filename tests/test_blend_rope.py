"""RoPE re-rotation: exact against rotation at the new positions, and the fused Triton kernel.

The kernel runs in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors and
must equal the torch reference; both write only the given pool slots.
"""

from __future__ import annotations

import pytest
import torch

from lmcache_sgl.blend.rope import Llama3Scaling, RopeSpec, cos_sin, rerotate, rerotate_into, rotate
from lmcache_sgl.triton_kernels._triton_compat import HAVE_TRITON, is_interpreted
from lmcache_sgl.triton_kernels.rope_rerotate import (_rerotate_scatter_kernel, rerotate_scatter_torch,
                                                       rerotate_scatter_triton)

LLAMA3 = Llama3Scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
SPECS = {
    "default-neox": RopeSpec(32, 32, 10000.0, True),
    "default-gptj": RopeSpec(32, 32, 10000.0, False),
    "partial-neox": RopeSpec(24, 16, 500000.0, True),
    "partial-gptj": RopeSpec(24, 16, 10000.0, False),
    "llama3-neox": RopeSpec(32, 32, 500000.0, True, LLAMA3),
    "llama3-gptj": RopeSpec(32, 32, 500000.0, False, LLAMA3),
}
INTERPRETED = HAVE_TRITON and is_interpreted(_rerotate_scatter_kernel)
needs_interp = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 and triton")


def _k(t: int, h: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, h, d, generator=torch.Generator().manual_seed(seed))


def _positions(t: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    return torch.randint(lo, hi, (t,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SPECS)
def test_rerotate_equals_rotation_at_the_new_positions(name):
    """rerotate(rotate(k, p0), p0, p1) == rotate(k, p1) in fp32, for every variant; p1 - 1 is caught."""
    spec = SPECS[name]
    k = _k(40, 3, spec.head_dim)
    p0, p1 = _positions(40, 0, 3000, 1), _positions(40, 0, 3000, 2)
    moved = rerotate(rotate(k, p0, spec), p0, p1, spec)
    want = rotate(k, p1, spec)
    torch.testing.assert_close(moved, want, rtol=0, atol=5e-6)
    assert torch.equal(moved[..., spec.rotary_dim:], k[..., spec.rotary_dim:])  # the unrotated tail is untouched
    off_by_one = rerotate(rotate(k, p0, spec), p0, p1 - 1, spec)
    assert (off_by_one - want).abs().max() > 1e-2


def test_rotation_matches_the_textbook_pairs():
    """Neox turns pairs (i, i + R/2), GPT-J pairs (2i, 2i + 1), each by position * theta^(-2i/R)."""
    k = _k(1, 1, 8)
    pos = torch.tensor([3])
    for neox in (True, False):
        spec = RopeSpec(8, 8, 100.0, neox)
        out = rotate(k, pos, spec)[0, 0]
        for i in range(4):
            a, b = (i, i + 4) if neox else (2 * i, 2 * i + 1)
            ang = torch.tensor(3 * 100.0 ** (-2 * i / 8), dtype=torch.float64)
            want_a = k[0, 0, a] * ang.cos() - k[0, 0, b] * ang.sin()
            want_b = k[0, 0, b] * ang.cos() + k[0, 0, a] * ang.sin()
            torch.testing.assert_close(out[[a, b]].double(), torch.stack([want_a, want_b]), rtol=0, atol=1e-6)


def test_llama3_scaling_slows_only_long_wavelengths():
    """llama3: high frequencies kept, low ones divided by factor, the band between in between."""
    base = RopeSpec(32, 32, 500000.0).inv_freq()
    scaled = RopeSpec(32, 32, 500000.0, scaling=LLAMA3).inv_freq()
    assert scaled[0] == base[0]  # shortest wavelength (2 pi) is under original_len / high_freq_factor
    torch.testing.assert_close(scaled[-1], base[-1] / 8)
    ratio = base / scaled
    assert ((ratio >= 1 - 1e-12) & (ratio <= 8 + 1e-9)).all() and ((ratio > 1.01) & (ratio < 7.99)).any()


def test_from_hf_config_reads_variants_and_refuses_others():
    """Default and llama3 (old rope_scaling or transformers-5 rope_parameters) parse; others raise naming the type."""
    spec = RopeSpec.from_hf_config({"rope_theta": 500000.0}, 64)
    assert (spec.rotary_dim, spec.theta, spec.scaling) == (64, 500000.0, None)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    assert RopeSpec.from_hf_config({"rope_theta": 1e4, "rope_scaling": llama3}, 64).scaling.factor == 8.0
    new_style = RopeSpec.from_hf_config({"rope_parameters": {"rope_theta": 2e5, **llama3}}, 64)
    assert new_style.theta == 2e5 and new_style.scaling.original_max_position_embeddings == 8192
    assert RopeSpec.from_hf_config({"partial_rotary_factor": 0.5}, 64).rotary_dim == 32
    for kind in ("yarn", "dynamic", "linear"):
        with pytest.raises(ValueError, match=f"rope_scaling type '{kind}' is not supported"):
            RopeSpec.from_hf_config({"rope_scaling": {"rope_type": kind, "factor": 2.0}}, 64)
    with pytest.raises(ValueError, match="rotary_dim=6"):
        RopeSpec(4, 6, 1e4)


def _pool_case(spec: RopeSpec, t: int, dtype: torch.dtype, seed: int):
    """A non-contiguous pool [S, H, D] (a head slice of a wider buffer) full of a NaN sentinel, and random slots."""
    gen = torch.Generator().manual_seed(seed)
    h, s = 3, 4 * t + 5
    wide = torch.full((s, h + 2, spec.head_dim), float("nan"), dtype=dtype)
    pool = wide[:, 1:h + 1]  # strides (5*D, D, 1)
    slots = torch.randperm(s, generator=gen)[:t]
    k = torch.randn(t, h, spec.head_dim, generator=gen).to(dtype)
    delta = torch.randint(-2000, 2000, (t,), generator=gen)
    return wide, pool, slots, k, delta


@needs_interp
@pytest.mark.parametrize("name", ["default-neox", "partial-gptj", "llama3-neox", "partial-neox"])
@pytest.mark.parametrize("t", [1, 7, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_equals_torch_reference(name, t, dtype):
    """Fused re-rotate + scatter: Triton (interpreted) == torch, only the given slots written."""
    spec = SPECS[name]
    wide_a, pool_a, slots, k, delta = _pool_case(spec, t, dtype, seed=t)
    wide_b = wide_a.clone()
    pool_b = wide_b[:, 1:4]
    cos, sin = cos_sin(delta, spec)
    kw = dict(rotary_dim=spec.rotary_dim, neox=spec.is_neox_style)
    rerotate_scatter_triton(k, cos, sin, pool_a, slots.to(torch.int32), **kw)
    rerotate_scatter_torch(k, cos, sin, pool_b, slots, **kw)
    # bf16: the two may round a float32 result that sits on a rounding edge to neighbouring values (1 ulp).
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(wide_a, wide_b, equal_nan=True, **tol)
    written = torch.zeros(wide_a.shape[0], dtype=torch.bool)
    written[slots] = True
    assert not torch.isnan(pool_a[written]).any()
    assert torch.isnan(pool_a[~written]).all() and torch.isnan(wide_a[:, [0, 4]]).all()
    want = rerotate(k, torch.zeros(t, dtype=torch.long), delta, spec)
    torch.testing.assert_close(pool_a[slots], want, **tol)


@needs_interp
def test_rerotate_into_pool_matches_rotation_at_the_new_positions():
    """The store-to-pool path: K stored at local positions lands in the pool as K rotated at its prompt positions."""
    spec = SPECS["llama3-neox"]
    raw = _k(33, 3, spec.head_dim, seed=3)
    local = torch.arange(33)
    stored = rotate(raw, local, spec)
    _, pool, slots, _, _ = _pool_case(spec, 33, torch.float32, seed=4)
    rerotate_into(pool, slots, stored, local, local + 1000, spec, backend="triton")
    torch.testing.assert_close(pool[slots], rotate(raw, local + 1000, spec), rtol=0, atol=5e-6)
    assert (pool[slots] - rotate(raw, local + 1001, spec)).abs().max() > 1e-2  # off by one is caught


def test_kernel_arguments_are_checked():
    """Mismatched shapes and dtypes are ValueErrors naming the argument."""
    spec = SPECS["default-neox"]
    _, pool, slots, k, delta = _pool_case(spec, 4, torch.float32, seed=0)
    cos, sin = cos_sin(delta, spec)
    with pytest.raises(ValueError, match="slots must be"):
        rerotate_scatter_torch(k, cos, sin, pool, slots[:3], rotary_dim=32, neox=True)
    with pytest.raises(ValueError, match="cos must be"):
        rerotate_scatter_torch(k, cos.double(), sin, pool, slots, rotary_dim=32, neox=True)
    with pytest.raises(ValueError, match="pool must be"):
        rerotate_scatter_torch(k, cos, sin, pool[..., ::2], slots, rotary_dim=32, neox=True)
