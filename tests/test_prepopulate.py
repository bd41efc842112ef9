"""prepopulate: a transformers forward per JSONL prompt, stored under the engines' keys."""

import json

import pytest
import torch

from conftest import require

require("transformers")

from lmcache_sgl import CacheConfig, ChunkLayout, Tier, TieredStore, prefix_keys  # noqa: E402
from lmcache_sgl.cli import main  # noqa: E402
from lmcache_sgl.models import build_tiny_llama  # noqa: E402
from lmcache_sgl.prepopulate import compute_kv, fingerprint_of, prepopulate  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny-llama", num_layers=2, hidden_size=64,
                            num_heads=4, num_kv_heads=2)


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_prepopulated_chunks_are_the_models_kv(tiny, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    ids = list(range(5, 5 + 40))
    prompts = _jsonl(tmp_path / "p.jsonl", [{"token_ids": ids}, {"text": "The quick brown fox " * 8},
                                             {"messages": [{"role": "user", "content": "hello there " * 6}]},
                                             {"token_ids": [1, 2, 3]}])
    report = prepopulate(tiny, prompts, tmp_path / "cache", chunk_size=16)
    assert report.prompts == 4 and report.skipped == 1 and report.chunks_written >= 2 + 1
    fp = fingerprint_of(AutoConfig.from_pretrained(tiny), tiny, "float32")
    assert fp.model_name.startswith("tiny-llama@") and fp.num_kv_heads == 2 and fp.head_dim == 16
    layout = ChunkLayout(fp, 16)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    expected = compute_kv(model, ids[:32], torch.float32)  # [L, 2, 32, H, D]
    cfg = CacheConfig(chunk_size=16, local_cpu=False, local_disk=str(tmp_path / "cache"))
    with TieredStore(cfg, layout) as store:
        keys = prefix_keys(fp, ids, 16)
        assert store.lookup(keys).tiers == (Tier.DISK, Tier.DISK)
        got = store.get(keys, [ids[:16], ids[16:32]])
        assert torch.equal(torch.cat(got, dim=2), expected)
        text_ids = tok("The quick brown fox " * 8)["input_ids"]
        assert store.lookup(prefix_keys(fp, text_ids, 16)).num_hits == len(text_ids) // 16


def test_resume_skips_what_is_present_and_cli_reports(tiny, tmp_path, capsys):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"token_ids": list(range(100, 150))}])
    args = ["--json", "prepopulate", "--model", str(tiny), "--input", str(prompts),
            "--cache-dir", str(tmp_path / "c"), "--chunk-size", "16"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["chunks_written"] == 3 and second == {**first, "chunks_written": 0, "chunks_present": 3}


def test_bad_input_is_a_clear_error(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"token_ids": [1]}\n{"nope": 1}\n')
    assert main(["prepopulate", "--model", str(tiny), "--input", str(bad), "--cache-dir", str(tmp_path)]) == 2
    assert "bad.jsonl:2: expected an object with 'token_ids', 'text' or 'messages'" in capsys.readouterr().err
    assert main(["prepopulate", "--model", str(tmp_path), "--input", str(bad), "--cache-dir", str(tmp_path)]) == 2
