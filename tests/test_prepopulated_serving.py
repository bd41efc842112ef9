"""A cache warmed offline by `lmcache-sgl prepopulate` is served by SGLang, then by vLLM.

A tiny random Llama with a token-id prompt, and SmolLM2-135M-Instruct with a
chat (messages) record; float32, chunk size 64:
  prepopulate  transformers forward -> DIR
  SGLang S0    stock                             baseline
  SGLang S1    --enable-lmcache on DIR          first request: every full chunk from disk, same greedy tokens
  vLLM   V0    no connector                      baseline
  vLLM   V1    connector on DIR                  every full chunk loaded, same greedy tokens
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import require

require("vllm")
require("sglang")

from test_sglang_e2e import Server  # noqa: E402
from test_vllm_engine import MAX_TOKENS, run_engine, smollm2  # noqa: E402,F401 (smollm2: a fixture)

from lmcache_sgl.cli import main  # noqa: E402
from lmcache_sgl.models import build_tiny_llama, sample_text  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.sglang]

CHUNK = 64  # test_vllm_engine.run_engine uses the same


def _serve_prepopulated(tmp_path, model, record: dict, prompt: list[int]) -> None:
    """prepopulate ``record`` (whose tokens are ``prompt``), then both engines must hit it and decode as stock."""
    assert len(prompt) % CHUNK, "a prompt of whole chunks would be a full-prompt hit; keep a tail"
    hit = len(prompt) // CHUNK * CHUNK
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps(record) + "\n")
    disk = tmp_path / "kv"
    assert main(["prepopulate", "--model", str(model), "--input", str(jsonl), "--cache-dir", str(disk),
                 "--chunk-size", str(CHUNK), "--kv-dtype", "float32"]) == 0
    assert len(list(disk.rglob("*.kv"))) == hit // CHUNK

    stock = Server(model, tmp_path / "s0.log")
    try:
        want = stock.generate(prompt, MAX_TOKENS)["tokens"]
    finally:
        stock.stop()
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text(f"chunk_size: {CHUNK}\nmax_local_cpu_size: 0.1\nlocal_disk: {disk}\nprefetch_policy: wait_complete\n")
    warm = Server(model, tmp_path / "s1.log", ["--enable-lmcache", "--lmcache-config-file", str(cfg)])
    try:
        got = warm.generate(prompt, MAX_TOKENS)
    finally:
        warm.stop()
    assert (got["disk"], got["tokens"]) == (hit, want)

    (v0,) = run_engine(tmp_path, model, [prompt], disk=None)
    (v1,) = run_engine(tmp_path, model, [prompt], disk)
    assert v1 == {"tokens": v0["tokens"], "cached": [hit]}


def test_prepopulated_cache_serves_sglang_then_vllm(tmp_path):
    model = build_tiny_llama(tmp_path / "tiny-llama-prepop", num_layers=2, hidden_size=128, num_heads=2,
                             num_kv_heads=2, head_dim=64, vocab_size=512)
    prompt = torch.randint(3, 500, (220,), generator=torch.Generator().manual_seed(11)).tolist()
    _serve_prepopulated(tmp_path, model, {"token_ids": prompt}, prompt)


def test_smollm2_chat_prepopulated_from_messages(tmp_path, smollm2):
    """The issue's scenario on a real model: a chat JSONL record, tokenized by prepopulate's chat template."""
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "You answer questions about the attached text."},
                {"role": "user", "content": sample_text(900) + "\n\nWhat is this text about?"}]
    prompt = list(AutoTokenizer.from_pretrained(smollm2).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    if len(prompt) % CHUNK == 0:
        messages[1]["content"] += " Briefly."
        prompt = list(AutoTokenizer.from_pretrained(smollm2).apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    _serve_prepopulated(tmp_path, smollm2, {"messages": messages}, prompt)
