"""Warm a disk cache offline: a transformers forward per prompt, stored as chunks.

The keys and the chunk layout are the ones the engines use (``prefix_keys``
over the same token ids, fingerprint named by ``model_identity``), so a
SGLang server or a vLLM connector on the same directory hits these chunks.
Prompts are read from JSONL, one object per line:

    {"token_ids": [1, 2, 3]}                       used as is
    {"text": "..."}                                 tokenized like an engine's /generate
    {"messages": [{"role": "user", "content": ...}]} chat template + generation prompt

Only ``text`` and ``messages`` records load the model's tokenizer, so a
checkpoint without tokenizer files can be prepopulated from ``token_ids``.
Resumable: a prompt whose chunks are all present is skipped, so rerunning
after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from .config import CacheConfig, ConfigError
from .keys import ModelFingerprint, prefix_keys
from .model_identity import model_identity
from .layout import ChunkLayout, dtype_from_name
from .tiered_store import TieredStore


# put() returns False only when no tier takes the chunk now; one drain of the
# write-back queue makes room if anything can, the extra tries are a margin.
PUT_ATTEMPTS = 3


@dataclass
class PrepopulateReport:
    prompts: int
    chunks_written: int
    chunks_present: int
    skipped: int  # prompts shorter than one chunk


def fingerprint_of(model_config: Any, model_dir: str | Path, kv_dtype: str,
                   model_id: str | None = None) -> ModelFingerprint:
    """The fingerprint an engine serving ``model_dir`` with KV in ``kv_dtype`` uses (TP 1)."""
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return ModelFingerprint(model_identity(model_dir, model_id), kv_dtype, model_config.num_hidden_layers,
                            getattr(model_config, "num_key_value_heads", None) or heads, head_dim)


def compute_kv(model: torch.nn.Module, token_ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """KV of a prompt as the engines store it (K after RoPE): [L, 2, T, H, D]."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([token_ids]), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    if hasattr(cache, "layers"):  # transformers >= 4.56: DynamicCache.layers[i].keys
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:  # a legacy tuple of (k, v) per layer
        pairs = [(k, v) for k, v in cache]
    # each k, v: [1, H, T, D] -> [T, H, D]
    kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in pairs])  # [L, 2, H, T, D]
    return kv.transpose(2, 3).to(dtype).contiguous()


def read_prompts(path: str | Path, tokenizer: Callable[[str], Any]) -> Iterator[list[int]]:
    """Token ids of each JSONL record; ``tokenizer(where)`` is called only for text or messages records."""
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON: {e}") from None
            yield _token_ids(record, tokenizer, f"{path}:{line_no}")


def _token_ids(record: Any, tokenizer: Callable[[str], Any], where: str) -> list[int]:
    if isinstance(record, dict) and "token_ids" in record:
        return [int(t) for t in record["token_ids"]]
    if isinstance(record, dict) and "text" in record:
        return list(tokenizer(where)(record["text"])["input_ids"])
    if isinstance(record, dict) and "messages" in record:
        ids = tokenizer(where).apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    raise ValueError(f"{where}: expected an object with 'token_ids', 'text' or 'messages'")


def lazy_tokenizer(model_dir: str | Path) -> Callable[[str], Any]:
    """``get(where)``: the model's tokenizer, loaded on first call, so token_ids-only inputs need none."""
    loaded: list[Any] = []

    def get(where: str) -> Any:
        if not loaded:
            from transformers import AutoTokenizer
            try:
                loaded.append(AutoTokenizer.from_pretrained(model_dir))
            except (OSError, ValueError) as e:
                raise ValueError(f"{where}: a 'text' or 'messages' record needs a tokenizer, but none loads from "
                                 f"{str(model_dir)!r} ({e}); give 'token_ids' records instead") from None
        return loaded[0]

    return get


def prepopulate(model_dir: str | Path, input_path: str | Path, cache_dir: str | Path, *, chunk_size: int = 256,
                kv_dtype: str = "float32", resume: bool = True, model_id: str | None = None,
                progress: Callable[[Iterable], Iterable] = lambda x: x) -> PrepopulateReport:
    from transformers import AutoModelForCausalLM

    if not Path(model_dir, "config.json").exists():
        raise ValueError(f"model directory {str(model_dir)!r} has no config.json")
    dtype = dtype_from_name(kv_dtype)
    prompts = list(read_prompts(input_path, lazy_tokenizer(model_dir)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    overrides = {"chunk_size": chunk_size, "local_cpu": False, "local_disk": str(cache_dir)}
    config = CacheConfig.load(overrides={**overrides, **({"model_id": model_id} if model_id else {})})
    layout = ChunkLayout(fingerprint_of(model.config, model_dir, kv_dtype, config.model_id), chunk_size)
    report = PrepopulateReport(0, 0, 0, 0)
    with TieredStore(config, layout) as store:
        for ids in progress(prompts):
            report.prompts += 1
            _store_prompt(store, model, layout, ids, dtype, resume, report)
    return report


def _store_prompt(store: TieredStore, model, layout: ChunkLayout, ids: list[int], dtype: torch.dtype,
                  resume: bool, report: PrepopulateReport) -> None:
    c = layout.chunk_size
    keys = prefix_keys(layout.fingerprint, ids, c)
    if not keys:
        report.skipped += 1
        return
    present = store.lookup(keys).num_hits if resume else 0
    report.chunks_present += present
    if present == len(keys):
        return
    kv = compute_kv(model, ids[:len(keys) * c], dtype)  # [L, 2, n_chunks*C, H, D]
    for i in range(present, len(keys)):
        chunk = kv[:, :, i * c:(i + 1) * c].contiguous()
        _put_chunk(store, keys[i], ids[i * c:(i + 1) * c], chunk, i * c)
        report.chunks_written += 1


def _put_chunk(store: TieredStore, key: str, token_ids: list[int], chunk: torch.Tensor, start_pos: int) -> None:
    """Put one chunk; a full write queue is drained and retried, a store with no room at all raises."""
    for _ in range(PUT_ATTEMPTS):
        if store.put(key, token_ids, chunk, start_pos=start_pos):
            return
        store.flush_pending()  # the write-back queue may be full: let it drain
    raise ConfigError(f"cannot store chunk {key} (tokens {start_pos}..{start_pos + len(token_ids)}): it was dropped "
                      f"{PUT_ATTEMPTS} times, with the write-back queue drained in between; "
                      f"{_no_room_reason(store.config, store.layout)}")


def _no_room_reason(config: CacheConfig, layout: ChunkLayout) -> str:
    """Why a store built from ``config`` has nowhere to put a chunk, naming the config values."""
    host = f"local_cpu={config.local_cpu}, max_local_cpu_size={config.max_local_cpu_size} GiB"
    host += (": no host tier" if config.host_bytes < layout.chunk_bytes
             else ": every host entry is pinned")
    if not config.local_disk:
        return f"{host}, and local_disk=None: no disk tier either"
    return (f"{host}, and local_disk={config.local_disk!r} could not be created or opened "
            f"(see the 'disk tier disabled' log line), so no tier can hold a chunk of {layout.chunk_bytes} bytes")
