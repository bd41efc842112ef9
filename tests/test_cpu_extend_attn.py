"""The CPU extend-attention shim equals SGLang's torch_native extend, computing only the new rows.

Inputs are laid out as a ForwardBatch hands them to
``TorchNativeAttnBackend._run_sdpa_forward_extend``: a paged KV pool whose
slots are scattered, ``req_to_token`` rows picked by ``req_pool_indices``, and
queries for the new tokens only, requests back to back. Random fp32 values.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from conftest import require

require("sglang")

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402

from lmcache_sgl.adapters.sglang import cpu_shims  # noqa: E402

pytestmark = pytest.mark.sglang

PAGE = 16
POOL_TOKENS = 4096
ATOL = 1e-5


class Batch(NamedTuple):
    query: torch.Tensor  # (num_new_tokens, H, D)
    k_cache: torch.Tensor  # (POOL_TOKENS, H_kv, D)
    v_cache: torch.Tensor  # (POOL_TOKENS, H_kv, Dv)
    req_to_token: torch.Tensor  # (max_reqs, max_context) int32
    req_pool_indices: torch.Tensor  # (num_reqs,) int64
    seq_lens: torch.Tensor
    extend_prefix_lens: torch.Tensor
    extend_seq_lens: torch.Tensor


def make_batch(prefixes, news, q_heads=4, kv_heads=4, head_dim=32, v_dim=None, seed=0) -> Batch:
    """One request per (prefix, new) pair, in scattered pool slots and pool rows."""
    g = torch.Generator().manual_seed(seed)
    v_dim = v_dim or head_dim
    max_reqs, max_context = 8, 2048
    req_to_token = torch.zeros(max_reqs, max_context, dtype=torch.int32)
    slots = torch.randperm(POOL_TOKENS, generator=g).to(torch.int32)
    rows = torch.randperm(max_reqs, generator=g)[:len(prefixes)]
    used = 0
    for row, p, n in zip(rows.tolist(), prefixes, news):
        req_to_token[row, :p + n] = slots[used:used + p + n]
        used += p + n
    seq = torch.tensor([p + n for p, n in zip(prefixes, news)], dtype=torch.int64)
    return Batch(query=torch.randn(sum(news), q_heads, head_dim, generator=g),
                 k_cache=torch.randn(POOL_TOKENS, kv_heads, head_dim, generator=g),
                 v_cache=torch.randn(POOL_TOKENS, kv_heads, v_dim, generator=g),
                 req_to_token=req_to_token, req_pool_indices=rows.to(torch.int64), seq_lens=seq,
                 extend_prefix_lens=torch.tensor(prefixes, dtype=torch.int64),
                 extend_seq_lens=torch.tensor(news, dtype=torch.int64))


def sglang_original():
    fn = TorchNativeAttnBackend._run_sdpa_forward_extend
    return getattr(fn, "__wrapped__", fn)  # unpatched even if a plugin load in this process installed the shim


def _args(b: Batch, out: torch.Tensor):
    return (b.query, out, b.k_cache, b.v_cache, b.req_to_token, b.req_pool_indices, b.seq_lens,
            b.extend_prefix_lens, b.extend_seq_lens)


def run_sglang(b: Batch, **kw) -> torch.Tensor:
    backend = object.__new__(TorchNativeAttnBackend)  # the extend path reads no instance state
    out = torch.full((b.query.shape[0], b.query.shape[1], b.v_cache.shape[2]), 7.0)
    kw = {"scaling": b.query.shape[2] ** -0.5, "enable_gqa": b.query.shape[1] != b.k_cache.shape[1],
          "causal": True, **kw}
    return sglang_original()(backend, *_args(b, out), **kw)


def run_shim(b: Batch) -> torch.Tensor:
    out = torch.full((b.query.shape[0], b.query.shape[1], b.v_cache.shape[2]), 7.0)
    return cpu_shims.suffix_extend_attention(*_args(b, out), scaling=b.query.shape[2] ** -0.5,
                                             enable_gqa=b.query.shape[1] != b.k_cache.shape[1])


CASES = {
    "no_prefix": ([0], [37]),
    "one_token_prefix": ([1], [20]),
    "one_page_prefix": ([PAGE], [9]),
    "many_pages_prefix": ([10 * PAGE], [45]),
    "decode_like_single_new_token": ([83], [1]),
    "mixed_batch": ([0, 1, PAGE, 7 * PAGE + 5, 300], [30, 17, 1, 64, 12]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_shim_equals_sglang_torch_native(case, heads):
    """For every prefix length, the shim's new-token rows equal SGLang's padded full attention."""
    prefixes, news = CASES[case]
    b = make_batch(prefixes, news, q_heads=heads[0], kv_heads=heads[1], seed=len(case))
    want, got = run_sglang(b), run_shim(b)
    assert not torch.equal(want, torch.full_like(want, 7.0))  # every row was written
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_value_head_dim_differs_from_qk():
    """Dv != D (as SGLang allows) keeps the value width in the output."""
    b = make_batch([PAGE, 3], [5, 11], q_heads=6, kv_heads=2, head_dim=32, v_dim=16, seed=3)
    torch.testing.assert_close(run_shim(b), run_sglang(b), atol=ATOL, rtol=0)


def test_masked_sdpa_path_equals_sglang_too(monkeypatch):
    """Without torch's CPU flash op (or for Dv != D) the shim uses one masked SDPA call: same answer."""
    monkeypatch.setattr(cpu_shims, "_FLASH_CPU", None)
    b = make_batch(*CASES["mixed_batch"], q_heads=8, kv_heads=2, seed=13)
    torch.testing.assert_close(run_shim(b), run_sglang(b), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel", ["flash_split", "masked_sdpa"])
def test_mask_shifted_by_one_is_caught(monkeypatch, kernel):
    """Negative control: letting each new token see one key ahead makes the comparison fail, on both paths."""
    b = make_batch([PAGE, 5 * PAGE], [12, 20], q_heads=8, kv_heads=2, seed=11)
    want = run_sglang(b)
    torch.testing.assert_close(run_shim(b), want, atol=ATOL, rtol=0)
    if kernel == "masked_sdpa":
        monkeypatch.setattr(cpu_shims, "_FLASH_CPU", None)
        monkeypatch.setattr(cpu_shims, "suffix_causal_mask", lambda new_len, seq_len, device: torch.ones(
            new_len, seq_len, dtype=torch.bool, device=device).tril(diagonal=seq_len - new_len + 1))
    else:
        split = cpu_shims._prefix_plus_causal
        monkeypatch.setattr(cpu_shims, "_prefix_plus_causal",
                            lambda q, k, v, scaling, prefix_len: split(q, k, v, scaling, prefix_len + 1))
    assert not torch.allclose(run_shim(b), want, atol=1e-3)


def test_top_left_causal_is_wrong_with_a_prefix():
    """Negative control: SDPA's is_causal with fewer queries than keys (top-left aligned) is not the answer."""
    b = make_batch([2 * PAGE], [10], seed=5)
    q = b.query.movedim(0, 1).unsqueeze(0)
    slots = b.req_to_token[b.req_pool_indices[0], :int(b.seq_lens[0])]
    k, v = (c[slots].movedim(0, 1).unsqueeze(0) for c in (b.k_cache, b.v_cache))
    top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(0).movedim(0, 1)
    assert not torch.allclose(top_left, run_sglang(b), atol=1e-3)


def test_suffix_mask_rows_see_the_prefix_and_themselves():
    """Row i of a (new, seq) mask sees keys [0, seq - new + i]: exactly seq - new + i + 1 keys."""
    mask = cpu_shims.suffix_causal_mask(4, 10, torch.device("cpu"))
    assert mask.sum(dim=1).tolist() == [7, 8, 9, 10]
    assert mask[0, :7].all() and not mask[0, 7:].any()


def test_inconsistent_lengths_raise():
    """seq_len must be prefix + new; anything else names the numbers."""
    b = make_batch([PAGE], [8])
    b = b._replace(seq_lens=b.seq_lens + 1)
    with pytest.raises(ValueError, match="does not add up to seq_len 25"):
        run_shim(b)


def test_unsupported_calls_go_to_sglang(monkeypatch):
    """Sliding window, non-causal and encoder calls run SGLang's own function, unchanged."""
    calls = []

    def spy(self, *args, **kw):
        calls.append(kw)
        return sglang_original()(self, *args, **kw)

    shim = cpu_shims._make_extend_shim(spy)
    b = make_batch([PAGE], [8], seed=2)
    backend = object.__new__(TorchNativeAttnBackend)
    for kw in ({"sliding_window_size": 4, "causal": True}, {"causal": False}):
        out = torch.zeros(8, 4, 32)
        shim(backend, *_args(b, out), scaling=None, **kw)
        torch.testing.assert_close(out, run_sglang(b, scaling=None, **kw), atol=ATOL, rtol=0)
    shim(backend, *_args(b, torch.zeros(8, 4, 32)), causal=True)
    assert [c.get("sliding_window_size") for c in calls] == [4, None]  # the plain causal call did not reach it


@pytest.mark.parametrize("raw,expected", [(None, True), ("", True), ("1", True), ("on", True),
                                          ("0", False), ("false", False), ("OFF", False)])
def test_env_switch(raw, expected):
    env = {} if raw is None else {cpu_shims.EXTEND_ATTN_ENV: raw}
    assert cpu_shims.extend_attention_enabled(env) is expected


def test_env_switch_rejects_unknown_values():
    with pytest.raises(ValueError, match="LMCACHE_SGL_CPU_EXTEND_ATTN='maybe' is invalid; allowed"):
        cpu_shims.extend_attention_enabled({cpu_shims.EXTEND_ATTN_ENV: "maybe"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims apply only without CUDA")
def test_apply_installs_once_and_the_switch_leaves_sglang_alone(monkeypatch, caplog):
    """On a CUDA-less torch: on by default, off with =0 (a warning); the class method is the shim only when on."""
    original = sglang_original()
    monkeypatch.setattr(TorchNativeAttnBackend, "_run_sdpa_forward_extend", original)  # restored afterwards
    with caplog.at_level("INFO", logger=cpu_shims.__name__):
        assert cpu_shims.apply({cpu_shims.EXTEND_ATTN_ENV: "0"}) == cpu_shims.AppliedShims(True, False)
    assert TorchNativeAttnBackend._run_sdpa_forward_extend is original
    assert [r.levelname for r in caplog.records if "shim off" in r.getMessage()] == ["WARNING"]
    assert cpu_shims.apply({}) == cpu_shims.AppliedShims(True, True)
    assert cpu_shims.apply({}) == cpu_shims.AppliedShims(True, True)
    assert TorchNativeAttnBackend._run_sdpa_forward_extend.__wrapped__ is original  # wrapped once, not twice


def test_first_shimmed_call_logs_once(monkeypatch, caplog):
    """The INFO line comes with the first call (SGLang configures logging after plugins load), and only once."""
    monkeypatch.setattr(cpu_shims, "_ANNOUNCED", cpu_shims.threading.Event())
    shim = cpu_shims._make_extend_shim(sglang_original())
    b = make_batch([PAGE], [8], seed=4)
    backend = object.__new__(TorchNativeAttnBackend)
    with caplog.at_level("INFO", logger=cpu_shims.__name__):
        for _ in range(2):
            shim(backend, *_args(b, torch.zeros(8, 4, 32)), causal=True)
    assert sum("extend-attention shim active" in r.getMessage() for r in caplog.records) == 1


# ---- end to end: a real CPU SGLang server, shim on and off ----

E2E_PREFIX = 512


class LogprobServer:
    """Greedy /generate on token ids with output logprobs and SGLang's cached-token count."""

    def __init__(self, model, log, env):
        from lmcache_sgl.adapters.sglang.local_server import LocalServer

        self.server = LocalServer(model, log, env=env)

    def generate(self, ids: list[int], max_new_tokens: int = 8) -> dict:
        import requests

        body = {"input_ids": ids, "return_logprob": True,
                "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
        r = requests.post(self.server.url("/generate"), json=body, timeout=120)
        r.raise_for_status()
        meta = r.json()["meta_info"]
        return {"tokens": r.json()["output_ids"], "cached": meta["cached_tokens"],
                "logprobs": [lp for lp, _tok, _text in meta["output_token_logprobs"]]}

    def stop(self) -> None:
        self.server.stop()


def e2e_prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=g).tolist()


def run_e2e(server: LogprobServer) -> dict:
    """Sequential prefixes of 0, one page, many pages and the whole prompt, then a concurrent mixed batch."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = e2e_prompt(1, E2E_PREFIX), e2e_prompt(2, 200)
    out = {"cold": server.generate(a + [7, 8, 9]),
           "whole_prefix": server.generate(a + [10, 11, 12]),
           "one_page": server.generate(a[:PAGE] + [13, 14, 15, 16]),
           "many_pages": server.generate(a[:300] + [17, 18]),
           "b_cold": server.generate(b)}
    mixed = [a + [20, 21], b[:PAGE + 3] + [22], a[:100] + b[:50], e2e_prompt(3, 40)]
    with ThreadPoolExecutor(len(mixed)) as pool:
        for i, res in enumerate(pool.map(server.generate, mixed)):
            out[f"mixed_{i}"] = res
    return out


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> dict:
    from lmcache_sgl.models import build_tiny_llama

    model = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    work = tmp_path_factory.mktemp("cpu-extend-attn")
    runs = {}
    for name, value in (("on", "1"), ("off", "0")):
        server = LogprobServer(model, work / f"{name}.log", {cpu_shims.EXTEND_ATTN_ENV: value})
        try:
            runs[name] = run_e2e(server)
        finally:
            server.stop()
        runs[f"{name}_log"] = (work / f"{name}.log").read_text()
    return runs


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim applies only without CUDA")
def test_server_greedy_output_and_logprobs_equal_with_shim_on_and_off(e2e):
    """fp32 server, tiny random Llama (GQA): prefix hits give the same tokens and logprobs either way."""
    on, off = e2e["on"], e2e["off"]
    assert on["whole_prefix"]["cached"] >= E2E_PREFIX - PAGE and on["many_pages"]["cached"] >= 288
    assert on["one_page"]["cached"] == PAGE
    for name in off:
        assert on[name]["cached"] == off[name]["cached"] or name.startswith("mixed"), name
        assert on[name]["tokens"] == off[name]["tokens"], name
        torch.testing.assert_close(torch.tensor(on[name]["logprobs"]), torch.tensor(off[name]["logprobs"]),
                                   atol=1e-4, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim applies only without CUDA")
def test_server_log_says_whether_the_shim_is_active(e2e):
    assert "extend-attention shim active" in e2e["on_log"]
    assert "extend-attention shim active" not in e2e["off_log"]
    assert "extend-attention shim off" in e2e["off_log"]
