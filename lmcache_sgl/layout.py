"""The canonical in-store layout of one chunk, shared by every engine.

A chunk of T tokens is one contiguous tensor

    MHA: [num_layers, 2, T, num_kv_heads, head_dim]   # plane 0 = K, plane 1 = V
    MLA: [num_layers, 1, T, 1, kv_lora_rank + rope_dim]

Engine adapters gather their paged pools into this layout and scatter it back,
so a chunk saved by SGLang is loaded by vLLM unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .keys import ModelFingerprint
from .storage.chunk_file import DTYPES as _DTYPES


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"kv dtype {name!r} is not supported; allowed: {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    dtype_from_name(name)  # validates
    return name


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    fingerprint: ModelFingerprint
    chunk_size: int

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_name(self.fingerprint.kv_dtype)

    @property
    def planes(self) -> int:
        return 1 if self.fingerprint.use_mla else 2

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        fp = self.fingerprint
        return (fp.num_layers, self.planes, num_tokens, fp.num_kv_heads, fp.head_dim)

    def nbytes(self, num_tokens: int) -> int:
        fp = self.fingerprint
        return fp.num_layers * self.planes * num_tokens * fp.num_kv_heads * fp.head_dim * self.dtype.itemsize

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one full chunk: the host tier's slot size."""
        return self.nbytes(self.chunk_size)
