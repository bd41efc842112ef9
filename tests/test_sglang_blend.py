"""Blended reuse on SGLang: the adapter's attention by position, and real CPU servers.

Three servers on one tiny random Llama (fp32, 2 layers), shared by the module:

  X  --enable-lmcache, enable_blending, ratio 1.0 (check layer 1), segments >= 64 tokens
  Y  --enable-lmcache, blending off: SGLang's own forward (the hook calls the original)
  Z  as X at ratio 0.15: the approximate path (its own documents d4, d5)

Prompts are ``system # # doc # # doc # # question`` in token ids, with the
separator's ids from the served tokenizer. At ratio 1.0 a blend recomputes every
reused token, so its greedy output must equal Y's full prefill, while the stats
still show the tokens that came from stored segments.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch

from conftest import require

require("sglang")

from lmcache_sgl.adapters.sglang.blend_layers import BatchRows, SGLangBlendLayers  # noqa: E402
from lmcache_sgl.adapters.sglang.local_server import LocalServer  # noqa: E402
from lmcache_sgl.blend.segments import find_separators  # noqa: E402
from lmcache_sgl.models import build_tiny_llama  # noqa: E402

SEP_TEXT = " # # "
CHUNK = 64
MIN_TOKENS = 64


# ---- attention by position (no server) -------------------------------------------------------

class _Pool:
    def __init__(self, k, v):
        self.k, self.v = k, v

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v


def _attention_fixture(seed: int = 0):
    """Two requests (prefix 5 + extend 7, prefix 0 + extend 6) over a shuffled 40-slot pool, GQA 4:2 heads."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = 4, 2, 8
    pool = _Pool(torch.randn(40, hkv, d, generator=g), torch.randn(40, hkv, d, generator=g))
    req_to_token = torch.randperm(40, generator=g).reshape(2, 20).int()
    attn = SimpleNamespace(tp_q_head_num=hq, tp_k_head_num=hkv, qk_head_dim=d, v_head_dim=d, scaling=d ** -0.5,
                           layer_id=0)
    decoder = SimpleNamespace(self_attn=SimpleNamespace(attn=attn))
    batch = BatchRows(["a", "b"], [0, 7], [5, 0], [7, 6], [1, 0])
    fb = SimpleNamespace(out_cache_loc=torch.arange(13))
    layers = SGLangBlendLayers(SimpleNamespace(layers=[decoder]), fb, pool, req_to_token, batch)
    q = torch.randn(13, hq * d, generator=g)
    return layers, q


def test_attention_of_selected_rows_equals_those_rows_of_full_attention():
    """A query row's output over the request's slots does not depend on which other rows are queried."""
    layers, q = _attention_fixture()
    full = layers.attend(0, q, torch.arange(13))  # every extend row: the stock suffix attention
    subset = torch.tensor([0, 3, 6, 7, 12])  # rows of both requests, each request's last row included
    part = layers.attend(0, q[subset], subset)
    torch.testing.assert_close(part, full[subset], rtol=1e-5, atol=1e-5)


def test_attention_mask_is_by_position_not_by_row_order():
    """Negative control: a key slot after the query's position changes nothing; one before it does."""
    layers, q = _attention_fixture(1)
    row = torch.tensor([2])  # request a, position 5 + 2 = 7
    before = layers.attend(0, q[row], row)
    slots = layers.req_to_token[1]
    layers.pool.k[slots[9].long()] += 5.0  # position 9 > 7: masked
    torch.testing.assert_close(layers.attend(0, q[row], row), before)
    layers.pool.k[slots[3].long()] += 5.0  # position 3 <= 7: attended
    assert not torch.allclose(layers.attend(0, q[row], row), before)


def test_batch_rows_map_rows_to_requests():
    batch = BatchRows(["a", "b", "c"], [0, 4, 4], [0, 2, 9], [4, 0, 3], [0, 1, 2])
    assert batch.request_of_rows(torch.tensor([0, 3, 4, 6])).tolist() == [0, 0, 2, 2]


# ---- injecting stored segments: the fused Triton path and the torch path (no server) -----------

class _Planes:
    """An MHA pool's per-layer K/V planes [slots, H, D] with SGLang's write door."""

    def __init__(self, layers: int, slots: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.k = [torch.randn(slots, 2, 16, generator=g) for _ in range(layers)]
        self.v = [torch.randn(slots, 2, 16, generator=g) for _ in range(layers)]

    def get_key_buffer(self, layer_id):
        return self.k[layer_id]

    def get_value_buffer(self, layer_id):
        return self.v[layer_id]

    def set_kv_buffer(self, layer, loc, k, v):
        self.k[layer.layer_id][loc.loc.long()] = k
        self.v[layer.layer_id][loc.loc.long()] = v


def _injection_fixture(pool):
    """One request of 30 rows after a 4-row prefix: ``sys # # doc # # q`` with doc (18 tokens) stored."""
    from lmcache_sgl.adapters.sglang.blend_runtime import PromptBlend
    from lmcache_sgl.blend.rope import RopeSpec, rotate
    from lmcache_sgl.blend.store_io import find_matches, save_segments
    from lmcache_sgl.blend.segments import split_segments
    from lmcache_sgl.config import CacheConfig
    from lmcache_sgl.keys import ModelFingerprint
    from lmcache_sgl.layout import ChunkLayout
    from lmcache_sgl.tiered_store import TieredStore

    spec, sep, fp = RopeSpec(16, 16, 10000.0), [7, 8], ModelFingerprint("inj", "float32", 2, 2, 16)
    doc = list(range(100, 118))

    def kv(tokens):  # [L, 2, N, H, D], K rotated at 0..N-1
        raw = torch.stack([torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(t)) for t in tokens], dim=1)
        k = torch.stack([rotate(raw[layer], torch.arange(len(tokens)), spec) for layer in range(2)])
        return torch.stack([k, raw * 0.5 + 1.0], dim=1)

    store = TieredStore(CacheConfig(chunk_size=8, max_local_cpu_size=0.01, local_cpu=True), ChunkLayout(fp, 8))
    first = [1] + sep + doc + sep + [3]
    save_segments(store, fp, first, kv(first), spec, sep, 10)
    prompt = [5, 5, 5, 5, 5] + sep + doc + sep + [6, 6, 6]  # doc at rows 7..24
    plan = PromptBlend(prompt, split_segments(prompt, sep, 10), find_matches(store, fp, prompt, sep, 10))
    model = SimpleNamespace(layers=[SimpleNamespace(self_attn=SimpleNamespace(attn=SimpleNamespace(layer_id=i)))
                                    for i in range(2)])
    runtime = SimpleNamespace(store=store, rope=spec, kv_pool=pool, model=model,
                              device_kv=SimpleNamespace(device=torch.device("cpu")))
    batch = BatchRows(["a"], [0], [4], [len(prompt) - 4], [0])
    write_loc = torch.randperm(64, generator=torch.Generator().manual_seed(3))[:len(prompt) - 4]
    return runtime, batch, [plan], write_loc, kv(prompt), store


def test_fused_kernel_and_torch_injection_write_the_same_pool():
    """The Triton ``rerotate_into`` prewrite (interpreted here) and the torch turn written through
    ``set_kv_buffer`` leave identical pools: the stored document's K at its new rows, V as stored."""
    from lmcache_sgl.adapters.sglang.blend_hook import _inject

    torch_pool, fused_pool = _Planes(2, 64, 9), _Planes(2, 64, 9)
    runtime, batch, prompts, write_loc, want, store = _injection_fixture(torch_pool)
    with store:
        plain = _inject(runtime, batch, prompts, write_loc)  # a CPU pool: the torch path
        assert not plain.injected.prewritten
        layers = SGLangBlendLayers(runtime.model, SimpleNamespace(out_cache_loc=write_loc), torch_pool,
                                   torch.zeros(1, 64, dtype=torch.int32), batch)
        for layer in range(2):
            plain.injected.write(layers, layer, torch.arange(plain.injected.rows.numel()))
        runtime.kv_pool = fused_pool
        fused = _inject(runtime, batch, prompts, write_loc, backend="triton")
    assert fused.injected.prewritten
    assert torch.equal(fused.injected.rows, plain.injected.rows)
    assert plain.injected.rows.tolist() == [r - 4 for r in range(7, 25)]  # batch rows of prompt rows 7..24
    slots = write_loc[plain.injected.rows]
    for layer in range(2):
        torch.testing.assert_close(fused_pool.k[layer], torch_pool.k[layer], rtol=0, atol=1e-6)
        assert torch.equal(fused_pool.v[layer], torch_pool.v[layer])
        torch.testing.assert_close(fused_pool.k[layer][slots], want[layer, 0, 7:25], rtol=0, atol=1e-5)
        k, v = fused.injected.kv(layer)
        assert torch.equal(k, fused_pool.k[layer][slots]) and torch.equal(v, want[layer, 1, 7:25])
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(fused_pool.k[0][untouched], _Planes(2, 64, 9).k[0][untouched])


# ---- real servers ---------------------------------------------------------------------------

class Server(LocalServer):
    def generate(self, ids: list[int], max_new_tokens: int = 8) -> dict:
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
        r = requests.post(self.url("/generate"), json=body, timeout=300)
        r.raise_for_status()
        out = r.json()
        meta = out["meta_info"]
        return {"tokens": out["output_ids"], "cached": meta["cached_tokens"],
                "details": meta.get("cached_tokens_details") or {}}


def _config(tmp: Path, name: str, blending: bool, ratio: float = 1.0) -> list[str]:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(f"chunk_size: {CHUNK}\nlocal_cpu: true\nmax_local_cpu_size: 0.05\n"
                   f"enable_blending: {str(blending).lower()}\nblend_recompute_ratios: [{ratio}]\n"
                   f"blend_check_layers: [1]\nblend_min_tokens: {MIN_TOKENS}\n")
    return ["--enable-lmcache", "--lmcache-config-file", str(cfg)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-blend"))


@pytest.fixture(scope="module")
def sep(model) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model).encode(SEP_TEXT, add_special_tokens=False)


@pytest.fixture(scope="module")
def texts(sep):
    """Token runs free of the separator: two systems, three documents, questions."""
    def run(seed: int, n: int) -> list[int]:
        rnd = random.Random(seed)
        ids = [rnd.randrange(3, 500) for _ in range(n)]
        return [t if t not in sep else 300 + seed % 7 for t in ids]
    return SimpleNamespace(sys1=run(1, 20), sys2=run(2, 23), d1=run(11, 150), d2=run(12, 170), d3=run(13, 140),
                           d4=run(14, 160), d5=run(15, 145), q1=run(21, 12), q2=run(22, 9), plain=run(31, 300))


def _join(sep, *parts) -> list[int]:
    out = list(parts[0])
    for p in parts[1:]:
        out += sep + list(p)
    return out


@pytest.fixture(scope="module")
def servers(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sglang-blend")
    x = y = z = None
    try:
        x = Server(model, tmp / "x.log", _config(tmp, "x", True), pool_tokens=4096)
        y = Server(model, tmp / "y.log", _config(tmp, "y", False), pool_tokens=4096)
        z = Server(model, tmp / "z.log", _config(tmp, "z", True, ratio=0.15), pool_tokens=4096)
        yield SimpleNamespace(x=x, y=y, z=z)
    finally:
        for s in (x, y, z):
            if s is not None:
                s.stop()


@pytest.fixture(scope="module")
def reordered(servers, texts, sep) -> dict:
    """Documents first seen as d1, d2 are then served as d2, d1 after another system line."""
    first = _join(sep, texts.sys1, texts.d1, texts.d2, texts.q1)
    second = _join(sep, texts.sys2, texts.d2, texts.d1, texts.q2)
    assert len(find_separators(second, sep)) == 3
    return {"first": servers.x.generate(first), "second": servers.x.generate(second),
            "second_again": servers.x.generate(second), "second_y": servers.y.generate(second),
            "first_y": servers.y.generate(first), "log": servers.x.log_tail(400_000), "second_len": len(second)}


@pytest.mark.sglang
@pytest.mark.slow
def test_reordered_documents_are_blended(reordered, texts):
    """The second prompt's documents come from stored segments (saved by the first prompt's prefill)."""
    assert "blend" not in reordered["first"]["details"]  # nothing stored yet: a plain prefill
    details = reordered["second"]["details"]
    reusable = len(texts.d1) + len(texts.d2)
    assert details["blend"] == reusable, details
    assert details["blend_recomputed"] == reusable  # ratio 1.0
    assert f"{reusable} of {reordered['second_len']} prompt tokens reused from stored segments, {reusable} of them" \
        in reordered["log"]


@pytest.mark.sglang
@pytest.mark.slow
def test_ratio_one_equals_full_prefill(reordered):
    """Greedy tokens of a blend at ratio 1.0 equal the blending-off server's full prefill."""
    assert reordered["second"]["tokens"] == reordered["second_y"]["tokens"]
    assert reordered["first"]["tokens"] == reordered["first_y"]["tokens"]


@pytest.mark.sglang
@pytest.mark.slow
def test_blend_kv_never_enters_the_tree(reordered, texts):
    """The same blend prompt again: no device prefix hit (its KV was approximate), blended again."""
    again = reordered["second_again"]
    assert again["cached"] == 0, again
    assert again["details"]["blend"] == len(texts.d1) + len(texts.d2)
    assert again["tokens"] == reordered["second"]["tokens"]


@pytest.mark.sglang
@pytest.mark.slow
def test_no_separator_matches_blending_off(servers, texts, reordered):
    """A prompt without a separator: same tokens and cached-token counts as with blending off, twice."""
    plain = texts.plain + texts.q1
    xs = [servers.x.generate(plain) for _ in range(2)]
    ys = [servers.y.generate(plain) for _ in range(2)]
    assert [r["tokens"] for r in xs] == [r["tokens"] for r in ys]
    assert [r["cached"] for r in xs] == [r["cached"] for r in ys]
    assert xs[1]["cached"] > 0  # the repeat hits the prefix cache on both
    assert all("blend" not in r["details"] for r in xs)


@pytest.mark.sglang
@pytest.mark.slow
def test_concurrent_blend_and_plain_requests(servers, texts, sep, reordered):
    """Blend and non-blend requests sent together (possibly one batch) give the full-prefill tokens."""
    prompts = [_join(sep, texts.sys1, texts.d2, texts.q2), texts.plain + texts.q2,
               _join(sep, texts.sys2, texts.d1, texts.d3, texts.q1)]
    with ThreadPoolExecutor(3) as pool:
        xs = list(pool.map(servers.x.generate, prompts))
    ys = [servers.y.generate(p) for p in prompts]
    assert [r["tokens"] for r in xs] == [r["tokens"] for r in ys]
    assert xs[0]["details"]["blend"] == len(texts.d2)
    assert xs[2]["details"]["blend"] == len(texts.d1)  # d3 was never stored


@pytest.fixture(scope="module")
def approximate(servers, texts, sep) -> dict:
    """On Z (ratio 0.15): d4 stored by a plain prefill; d4 + new d5 blended (twice); d5 alone elsewhere."""
    z = servers.z
    stored = z.generate(_join(sep, texts.sys1, texts.d4, texts.q1))
    pair = _join(sep, texts.sys2, texts.d4, texts.d5, texts.q2)
    blended = z.generate(pair)
    again = z.generate(pair)
    moved = z.generate(_join(sep, texts.sys1, texts.q2, texts.d5, texts.q1))  # d5 after another run of tokens
    return {"stored": stored, "blended": blended, "again": again, "moved": moved, "pair_len": len(pair),
            "log": z.log_tail(400_000)}


@pytest.mark.sglang
@pytest.mark.slow
def test_ratio_015_blends_and_recomputes_a_share(approximate, texts):
    """The approximate path runs on a real server: a share of the reused tokens is recomputed, the
    greedy answer comes from the blend (log line; no fallback to a plain prefill)."""
    assert "blend" not in approximate["stored"]["details"]
    details = approximate["blended"]["details"]
    assert details["blend"] == len(texts.d4), details
    assert 0 < details["blend_recomputed"] < details["blend"], details
    assert len(approximate["blended"]["tokens"]) == 8
    log = approximate["log"]
    assert (f"{len(texts.d4)} of {approximate['pair_len']} prompt tokens reused from stored segments, "
            f"{details['blend_recomputed']} of them recomputed") in log
    assert "failed; prefilling instead" not in log


@pytest.mark.sglang
@pytest.mark.slow
def test_ratio_015_blend_is_never_a_prefix_hit(approximate):
    """The same blend prompt again reads no fused KV from the tree or the store's prefix chunks."""
    assert approximate["again"]["cached"] == 0, approximate["again"]
    assert approximate["again"]["details"]["blend"] > 0


@pytest.mark.sglang
@pytest.mark.slow
def test_new_document_of_a_blend_is_saved_and_blended_elsewhere(approximate, texts):
    """d5 (new in the blended prompt, no injected row) was saved after the blend: the repeat blends
    d4 and d5, and d5 at another position blends too."""
    assert approximate["again"]["details"]["blend"] == len(texts.d4) + len(texts.d5)
    moved = approximate["moved"]["details"]
    assert moved["blend"] == len(texts.d5), moved
    assert 0 < moved["blend_recomputed"] < moved["blend"]


# ---- startup checks (no server) ----------------------------------------------------------------

def _runner(class_name: str = "LlamaForCausalLM", num_layers: int = 2, **hf):
    attn = SimpleNamespace(head_dim=16)
    inner = SimpleNamespace(layers=[SimpleNamespace(self_attn=attn) for _ in range(num_layers)])
    model = type(class_name, (), {})()
    model.model = inner
    hf_config = SimpleNamespace(rope_theta=10000.0, **hf)
    return SimpleNamespace(model=model, model_config=SimpleNamespace(hf_config=hf_config))


def _blend_config(check: int = 1):
    return SimpleNamespace(blend_check_layers=(check,))


def test_startup_accepts_llama_with_default_and_llama3_rope():
    from lmcache_sgl.adapters.sglang.blend_runtime import check_blend_model

    assert check_blend_model(_runner(), _blend_config(), 1).scaling is None
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    assert check_blend_model(_runner(rope_scaling=llama3), _blend_config(), 1).scaling.factor == 8.0


@pytest.mark.parametrize("runner, config, tp, words", [
    (_runner("Qwen2ForCausalLM"), _blend_config(), 1, "Qwen2ForCausalLM"),
    (_runner(rope_scaling={"rope_type": "yarn", "factor": 4.0}), _blend_config(), 1, "'yarn'"),
    (_runner(num_layers=2), _blend_config(2), 1, "layer 2 is invalid for a 2-layer model"),
    (_runner(), _blend_config(), 2, "--tp-size 1 only"),
])
def test_startup_refuses_what_blending_cannot_serve(runner, config, tp, words):
    """Each refusal names what is wrong."""
    from lmcache_sgl.adapters.sglang.blend_runtime import check_blend_model

    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("-", r"\-")):
        check_blend_model(runner, config, tp)


def test_separator_without_tokens_is_refused():
    from lmcache_sgl.adapters.sglang.blend_runtime import separator_ids

    tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: [] if not text.strip() else [7, 8])
    assert separator_ids(tokenizer, " # ") == [7, 8]
    with pytest.raises(ValueError, match="blend_special_str"):
        separator_ids(tokenizer, "  ")
