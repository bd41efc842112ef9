"""The blend layer loop on a tiny random Llama (transformers, fp32): weight-independent invariants.

Each test states one invariant of ``blend_forward`` (CacheBlend semantics) and checks it
against HF's own forward, which shares no code with the loop.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import require

require("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from lmcache_sgl.blend import InjectedKV, blend_forward, rerotate  # noqa: E402
from lmcache_sgl.blend.hf_reference import HFBlendLayers, hf_blend, hf_prompt_kv, rope_spec_of  # noqa: E402

N = 48
REUSED = torch.arange(8, 36)  # a document in the middle of the prompt: rows [8, 36)
# Blend and HF run the same fp32 ops: bit-identical on the machine these were written on; a tolerance
# far below any blend effect (>1e-2) keeps the tests independent of BLAS kernel choices.
TIGHT = dict(rtol=0, atol=1e-6)
ROPE_TOL = dict(rtol=0, atol=2e-5)  # our float64 angles vs HF's float32 ones


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      attn_implementation="eager", dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # unit-variance weights: attention matters, so cross-document effects are visible
        for name, p in sorted(m.named_parameters()):
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / (1 if "embed" in name else p.shape[-1] ** 0.5))
    return m.eval()


def _tokens(seed: int, n: int = N) -> torch.Tensor:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed))


def _noisy(k: torch.Tensor, v: torch.Tensor, seed: int, scale: float = 0.5):
    """Stand-in stored K/V: the prompt's own K/V plus noise (never equal, never zero)."""
    gen = torch.Generator().manual_seed(seed)
    return k + scale * torch.randn(k.shape, generator=gen), v + scale * torch.randn(v.shape, generator=gen)


def _injected(k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> InjectedKV:
    return InjectedKV(rows, [k[layer, rows] for layer in range(k.shape[0])],
                      [v[layer, rows] for layer in range(v.shape[0])])


@torch.no_grad()
def test_ratio_one_equals_full_prefill(model):
    """Ratio 1.0 recomputes every reused row: logits and cache equal HF's full prefill, whatever was injected."""
    tokens = _tokens(0)
    full = model(tokens[None]).logits[0]
    k, v = hf_prompt_kv(model, tokens)
    bad_k, bad_v = _noisy(k, v, seed=1)
    for check in (0, 1, 2):
        run = hf_blend(model, tokens, _injected(bad_k, bad_v, REUSED), check, 1.0)
        assert torch.equal(run.out.rows, torch.arange(N))
        assert (run.out.reused, run.out.recomputed) == (0, REUSED.numel())
        torch.testing.assert_close(run.logits, full, **TIGHT)
        torch.testing.assert_close(run.layers.k_cache, k, **TIGHT)
        torch.testing.assert_close(run.layers.v_cache, v, **TIGHT)


@torch.no_grad()
def test_ratio_zero_check_zero_equals_plain_reuse(model):
    """Ratio 0 at check layer 0 is plain reuse: the other rows prefilled against the injected K/V as is."""
    tokens = _tokens(2)
    k, v = hf_prompt_kv(model, tokens)
    bad_k, bad_v = _noisy(k, v, seed=3)
    prefix = torch.arange(20)  # a reused prefix, so HF can run the same thing with past_key_values
    run = hf_blend(model, tokens, _injected(bad_k, bad_v, prefix), 0, 0.0)
    cache = DynamicCache()
    for layer in range(k.shape[0]):
        cache.update(bad_k[layer, :20].transpose(0, 1)[None], bad_v[layer, :20].transpose(0, 1)[None], layer)
    ref = model(tokens[None, 20:], past_key_values=cache, position_ids=torch.arange(20, N)[None]).logits[0]
    assert torch.equal(run.out.rows, torch.arange(20, N))
    assert (run.out.reused, run.out.recomputed) == (20, 0)
    torch.testing.assert_close(run.logits, ref, **TIGHT)
    # Control: the noise matters, so the comparison above could fail.
    assert (run.logits - model(tokens[None]).logits[0, 20:]).abs().max() > 1e-2


@torch.no_grad()
def test_exact_injected_kv_gives_full_prefill_at_ratio_zero(model):
    """Injecting a prompt's own exact K/V (a middle document) and recomputing nothing changes no logit."""
    tokens = _tokens(4)
    k, v = hf_prompt_kv(model, tokens)
    run = hf_blend(model, tokens, _injected(k, v, REUSED), 1, 0.0)
    rows = run.out.rows
    assert not torch.isin(REUSED, rows).any()
    torch.testing.assert_close(run.logits, model(tokens[None]).logits[0, rows], **TIGHT)


@torch.no_grad()
def test_cache_holds_fresh_kv_at_selected_rows_and_injected_elsewhere(model):
    """After a blend: layers < check hold full-prefill K/V; from check on, unselected reused rows hold the
    injected K/V bit for bit and selected rows fresh K/V (at the check layer: exactly full prefill's)."""
    tokens = _tokens(5)
    k, v = hf_prompt_kv(model, tokens)
    bad_k, bad_v = _noisy(k, v, seed=6)
    ratio, check = 0.3, 1
    run = hf_blend(model, tokens, _injected(bad_k, bad_v, REUSED), check, ratio)
    rows, kc, vc = run.out.rows, run.layers.k_cache, run.layers.v_cache
    picked = REUSED[torch.isin(REUSED, rows)]
    kept = REUSED[~torch.isin(REUSED, rows)]
    assert run.out.recomputed == picked.numel() == math.ceil(ratio * REUSED.numel())
    assert run.out.reused == kept.numel()
    non_reused = torch.tensor([r for r in range(N) if r not in set(REUSED.tolist())])
    assert torch.isin(non_reused, rows).all() and int(rows[-1]) == N - 1
    assert not torch.isnan(kc).any() and not torch.isnan(vc).any()
    torch.testing.assert_close(kc[:check], k[:check], **TIGHT)
    torch.testing.assert_close(kc[check, rows], k[check, rows], **TIGHT)
    torch.testing.assert_close(vc[check, rows], v[check, rows], **TIGHT)
    for layer in range(check, 3):
        assert torch.equal(kc[layer, kept], bad_k[layer, kept])
        assert torch.equal(vc[layer, kept], bad_v[layer, kept])
        assert (kc[layer, picked] - bad_k[layer, picked]).abs().amax(dim=(1, 2)).min() > 1e-3


@torch.no_grad()
def test_hkvd_picks_the_perturbed_rows(model):
    """With exact injected K/V except a few perturbed rows, HKVD at a matching ratio recomputes exactly those."""
    tokens = _tokens(7)
    k, v = hf_prompt_kv(model, tokens)
    perturbed = torch.tensor([9, 17, 18, 30])
    bad_k, bad_v = k.clone(), v.clone()
    gen = torch.Generator().manual_seed(8)
    bad_k[:, perturbed] += 0.3 * torch.randn(bad_k[:, perturbed].shape, generator=gen)
    ratio = perturbed.numel() / REUSED.numel()
    run = hf_blend(model, tokens, _injected(bad_k, bad_v, REUSED), 1, ratio)
    assert torch.equal(REUSED[torch.isin(REUSED, run.out.rows)], perturbed)
    # Control: random selection at the same ratio picks the same number of rows, but not these.
    rnd = hf_blend(model, tokens, _injected(bad_k, bad_v, REUSED), 1, ratio, "random",
                   torch.Generator().manual_seed(0))
    picked = REUSED[torch.isin(REUSED, rnd.out.rows)]
    assert picked.numel() == perturbed.numel() and not torch.equal(picked, perturbed)
    # And recomputing the perturbed rows repairs the output: equal to the full prefill.
    torch.testing.assert_close(run.logits, model(tokens[None]).logits[0, run.out.rows], **TIGHT)


@torch.no_grad()
def test_segment_reused_at_another_offset_has_the_k_computed_there(model):
    """A document's layer-0 K computed at offset a, moved to offset b, equals K computed at b (V is equal)."""
    spec = rope_spec_of(model)
    doc = _tokens(9, 24)
    a, b = 5, 37
    k_a, v_a = hf_prompt_kv(model, torch.cat([_tokens(10, a), doc]))
    k_b, v_b = hf_prompt_kv(model, torch.cat([_tokens(11, b), doc]))
    local = torch.arange(24)
    stored = rerotate(k_a[0, a:], local + a, local, spec)  # de-rotated to segment-local positions
    moved = rerotate(stored, local, local + b, spec)
    torch.testing.assert_close(moved, k_b[0, b:], **ROPE_TOL)
    torch.testing.assert_close(v_a[0, a:], v_b[0, b:], **TIGHT)
    off_by_one = rerotate(stored, local, local + b + 1, spec)
    assert (off_by_one - k_b[0, b:]).abs().max() > 1e-2  # negative control: one position off is caught


def test_blend_forward_refuses_bad_arguments(model):
    """A check layer out of range, or the last row marked reused, is a ValueError naming the problem."""
    layers = HFBlendLayers(model, 8)
    hidden = torch.randn(8, 64)
    kv = [torch.randn(2, 2, 16)] * 3
    with pytest.raises(ValueError, match="check layer 3"):
        blend_forward(layers, hidden, None, torch.arange(8), InjectedKV(torch.tensor([1, 2]), kv, kv), 3, 0.1)
    with pytest.raises(ValueError, match="last prompt row"):
        blend_forward(layers, hidden, None, torch.arange(8), InjectedKV(torch.tensor([6, 7]), kv, kv), 1, 0.1)
    with pytest.raises(ValueError, match="ascending"):
        InjectedKV(torch.tensor([3, 2]), kv, kv)


@torch.no_grad()
def test_prewritten_injection_gives_the_same_blend(model):
    """An adapter that scatters the injected K/V into its cache up front (prewritten) gets the same rows,
    logits and cache as the loop writing it layer by layer."""
    tokens = _tokens(12)
    k, v = hf_prompt_kv(model, tokens)
    bad_k, bad_v = _noisy(k, v, seed=13)
    ref = hf_blend(model, tokens, _injected(bad_k, bad_v, REUSED), 1, 0.2)
    layers = HFBlendLayers(model, N)
    layers.k_cache[:, REUSED], layers.v_cache[:, REUSED] = bad_k[:, REUSED], bad_v[:, REUSED]
    reads = []

    def loader(layer):
        reads.append(layer)
        return layers.k_cache[layer, REUSED].clone(), layers.v_cache[layer, REUSED].clone()
    inj = InjectedKV(REUSED, loader=loader, prewritten=True)
    out = blend_forward(layers, model.model.embed_tokens(tokens), None, torch.arange(N), inj, 1, 0.2)
    assert reads == [1]  # only the check layer's K/V is read, for the selection
    assert torch.equal(out.rows, ref.out.rows)
    torch.testing.assert_close(layers.logits(out.hidden), ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(layers.k_cache, ref.layers.k_cache, rtol=0, atol=0)
