"""prepopulate defects (issue #10 item 6): no endless put loop, no tokenizer unless a record needs one."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import require

require("transformers")

from lmcache_sgl import CacheConfig, ChunkLayout, Tier, TieredStore, prefix_keys  # noqa: E402
from lmcache_sgl.models import build_tiny_llama  # noqa: E402
from lmcache_sgl.prepopulate import compute_kv, fingerprint_of, prepopulate  # noqa: E402

# Generous: the child imports torch and transformers on a busy 2-core machine. A
# regression (the endless put loop) hits this limit and fails instead of hanging.
CHILD_TIMEOUT_S = 240
# The error itself must come quickly once the model is loaded.
ERROR_WITHIN_S = 15.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny-llama", num_layers=2, hidden_size=64,
                            num_heads=4, num_kv_heads=2)


@pytest.fixture
def tokenizer_free(tiny, tmp_path):
    """A copy of the tiny checkpoint with every tokenizer file removed (weights and config kept)."""
    model = shutil.copytree(tiny, tmp_path / "tiny-llama")
    for f in model.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            f.unlink()
    assert (model / "config.json").is_file() and not list(model.glob("tokenizer*"))
    return model


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _run_child(script: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"prepopulate did not return within {CHILD_TIMEOUT_S} s (endless put loop?): {e.stderr!r}")


def test_no_usable_tier_is_a_clear_error_not_a_hang(tiny, tmp_path):
    """A cache dir that cannot be created leaves no tier: prepopulate raises, naming the config, quickly."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache_dir = blocker / "cache"  # mkdir fails: its parent is a regular file
    prompts = _jsonl(tmp_path / "p.jsonl", [{"token_ids": list(range(5, 5 + 40))}])
    script = textwrap.dedent(f"""
        import sys, time
        import torch
        from lmcache_sgl.prepopulate import prepopulate
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(tiny)!r}, dtype=torch.float32)  # warm the imports and caches
        t = time.monotonic()
        try:
            prepopulate({str(tiny)!r}, {str(prompts)!r}, {str(cache_dir)!r}, chunk_size=16)
        except ValueError as e:
            print("ELAPSED", time.monotonic() - t)
            print("ERROR", e)
            sys.exit(3)
        sys.exit(0)
    """)
    child = _run_child(script)
    assert child.returncode == 3, (child.returncode, child.stdout, child.stderr[-2000:])
    elapsed = float(child.stdout.split("ELAPSED", 1)[1].split()[0])
    assert elapsed < ERROR_WITHIN_S, child.stdout
    message = child.stdout.split("ERROR", 1)[1]
    for name in ("local_cpu=False", "max_local_cpu_size", f"local_disk={str(cache_dir)!r}"):
        assert name in message, message


def test_token_ids_need_no_tokenizer_files(tokenizer_free, tmp_path):
    """Records with token_ids only: a checkpoint without tokenizer files prepopulates the model's KV."""
    ids = [list(range(5, 5 + 40)), list(range(300, 300 + 33))]
    prompts = _jsonl(tmp_path / "p.jsonl", [{"token_ids": t} for t in ids])
    report = prepopulate(tokenizer_free, prompts, tmp_path / "cache", chunk_size=16)
    assert (report.prompts, report.chunks_written, report.skipped) == (2, 4, 0)

    from transformers import AutoConfig, AutoModelForCausalLM

    fp = fingerprint_of(AutoConfig.from_pretrained(tokenizer_free), tokenizer_free, "float32")
    model = AutoModelForCausalLM.from_pretrained(tokenizer_free, dtype=torch.float32).eval()
    cfg = CacheConfig(chunk_size=16, local_cpu=False, local_disk=str(tmp_path / "cache"))
    with TieredStore(cfg, ChunkLayout(fp, 16)) as store:
        for prompt in ids:
            keys = prefix_keys(fp, prompt, 16)
            assert store.lookup(keys).tiers == (Tier.DISK, Tier.DISK)
            got = store.get(keys, [prompt[:16], prompt[16:32]])
            assert torch.equal(torch.cat(got, dim=2), compute_kv(model, prompt[:32], torch.float32))


def test_text_record_without_tokenizer_names_the_record(tokenizer_free, tmp_path):
    """A text record on a tokenizer-less checkpoint: a ValueError naming the line and the model dir."""
    prompts = _jsonl(tmp_path / "p.jsonl", [{"token_ids": list(range(5, 45))}, {"text": "hello there"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: .*tokenizer") as err:
        prepopulate(tokenizer_free, prompts, tmp_path / "cache", chunk_size=16)
    assert str(tokenizer_free) in str(err.value)
