"""A cache warmed offline by `lmcache-sgl prepopulate` is served by SGLang, then by vLLM.

One tiny random Llama (head_dim 64, float32), token-id prompts, chunk size 64:
  prepopulate  transformers forward -> DIR
  SGLang S0    stock                             baseline
  SGLang S1    --enable-lmcache on DIR          first request: 192 tokens from disk, same greedy tokens
  vLLM   V0    no connector                      baseline
  vLLM   V1    connector on DIR                  192 tokens loaded, same greedy tokens
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("sglang")

from test_sglang_e2e import Server  # noqa: E402
from test_vllm_engine import MAX_TOKENS, run_engine  # noqa: E402

from lmcache_sgl.cli import main  # noqa: E402
from lmcache_sgl.models import build_tiny_llama  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.sglang]

CHUNK = 64  # test_vllm_engine.run_engine uses the same


def test_prepopulated_cache_serves_sglang_then_vllm(tmp_path):
    model = build_tiny_llama(tmp_path / "tiny-llama-prepop", num_layers=2, hidden_size=128, num_heads=2,
                             num_kv_heads=2, head_dim=64, vocab_size=512)
    prompt = torch.randint(3, 500, (220,), generator=torch.Generator().manual_seed(11)).tolist()
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"token_ids": prompt}) + "\n")
    disk = tmp_path / "kv"
    assert main(["prepopulate", "--model", str(model), "--input", str(jsonl), "--cache-dir", str(disk),
                 "--chunk-size", str(CHUNK), "--kv-dtype", "float32"]) == 0
    assert len(list(disk.rglob("*.kv"))) == 3  # [0, 192) in three full chunks

    stock = Server(model, tmp_path / "s0.log")
    try:
        want = stock.generate(prompt, MAX_TOKENS)["tokens"]
    finally:
        stock.stop()
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text(f"chunk_size: {CHUNK}\nmax_local_cpu_size: 0.1\nlocal_disk: {disk}\n")
    warm = Server(model, tmp_path / "s1.log", ["--enable-lmcache", "--lmcache-config-file", str(cfg)])
    try:
        got = warm.generate(prompt, MAX_TOKENS)
    finally:
        warm.stop()
    assert (got["disk"], got["tokens"]) == (192, want)

    (v0,) = run_engine(tmp_path, model, [prompt], disk=None)
    (v1,) = run_engine(tmp_path, model, [prompt], disk)
    assert v1 == {"tokens": v0["tokens"], "cached": [192]}
