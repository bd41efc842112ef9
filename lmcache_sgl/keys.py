"""Seed-free, engine-independent chunk keys.

A prompt is cut into chunks of ``chunk_size`` token ids. Chunk ``i`` has the
prefix key

    k_{-1} = H_prefix(fingerprint)
    k_i    = H_prefix(k_{i-1} || int32_le(tokens[i*C : (i+1)*C]))

so a key names a chunk *and everything before it*. The content key of a chunk,
used for blended (non-prefix) reuse, names the chunk's tokens alone:

    c_i    = H_content(fingerprint || int32_le(tokens of chunk i))

A segment key (blended reuse, ``lmcache_sgl/blend``) names a document's chunk
and the document's earlier chunks, from the document's start, wherever the
document sits in a prompt:

    s_{-1} = H_segment(fingerprint)
    s_i    = H_segment(s_{i-1} || int32_le(segment tokens[i*C : (i+1)*C]))

H is blake2b with a 16-byte digest and a domain tag (``person``), so prefix,
content and segment keys can never collide with each other. Keys are lowercase hex strings
of 32 characters (filename-safe). Nothing depends on Python's ``hash()``, the
engine, the block size or the process, so SGLang, vLLM and the offline CLI
compute the same keys for the same prompt on any host.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import msgpack
import numpy as np

FORMAT_VERSION = 2  # 2: model_name carries a weights digest (model_identity.py); v1 keys are orphaned
_PREFIX_TAG = b"lmcsgl-prefix"
_CONTENT_TAG = b"lmcsgl-content"
_SEGMENT_TAG = b"lmcsgl-segment"


@dataclass(frozen=True, slots=True)
class ModelFingerprint:
    """Everything that decides whether stored KV can be reused as is.

    Two engines that agree on these fields produce interchangeable chunks: the
    store holds each chunk in one canonical layout (see ``ChunkLayout``).
    """

    model_name: str
    kv_dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    num_layers: int
    num_kv_heads: int  # per TP rank
    head_dim: int
    tp_rank: int = 0
    tp_size: int = 1
    use_mla: bool = False
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "tp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"fingerprint {name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"fingerprint tp_rank={self.tp_rank} must be in [0, tp_size={self.tp_size})")

    def to_bytes(self) -> bytes:
        # Field order is fixed by the dataclass, so the encoding is canonical.
        return msgpack.packb(list(asdict(self).items()), use_bin_type=True)

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return _hash(_PREFIX_TAG, self.to_bytes())


class ChunkSpan(NamedTuple):
    """Chunk ``index`` covers token positions [start, end) of the prompt."""

    index: int
    start: int
    end: int


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian int32, the byte form that every key hashes."""
    arr = np.asarray(token_ids, dtype=np.int64)
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError("token ids must fit in int32")
    return arr.astype("<i4").tobytes()


def chunk_spans(num_tokens: int, chunk_size: int, include_partial: bool) -> list[ChunkSpan]:
    """The chunks of a prompt of ``num_tokens``; the last, partial one only if asked."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    end_full = num_tokens - num_tokens % chunk_size
    spans = [ChunkSpan(i, s, s + chunk_size) for i, s in enumerate(range(0, end_full, chunk_size))]
    if include_partial and end_full < num_tokens:
        spans.append(ChunkSpan(len(spans), end_full, num_tokens))
    return spans


def prefix_keys(fingerprint: ModelFingerprint, token_ids: Sequence[int] | np.ndarray,
                chunk_size: int, include_partial: bool = False) -> list[str]:
    """Chained keys of the prompt's chunks, in order.

    A partial last chunk (``include_partial``) hashes fewer bytes than a full
    one, so it gets its own key and is never confused with a full chunk.
    """
    raw = token_bytes(token_ids)
    keys: list[str] = []
    prev = bytes.fromhex(fingerprint.digest())
    for span in chunk_spans(len(raw) // 4, chunk_size, include_partial):
        key = _hash(_PREFIX_TAG, prev + raw[4 * span.start: 4 * span.end])
        keys.append(key)
        prev = bytes.fromhex(key)
    return keys


def content_key(fingerprint: ModelFingerprint, chunk_token_ids: Sequence[int] | np.ndarray) -> str:
    """Position-independent key of one chunk's tokens (blended reuse)."""
    return _hash(_CONTENT_TAG, fingerprint.to_bytes() + token_bytes(chunk_token_ids))


def segment_keys(fingerprint: ModelFingerprint, seg_token_ids: Sequence[int] | np.ndarray,
                 chunk_size: int) -> list[str]:
    """Chained segment-domain keys of a segment's chunks, the partial last one included."""
    raw = token_bytes(seg_token_ids)
    keys: list[str] = []
    prev = bytes.fromhex(_hash(_SEGMENT_TAG, fingerprint.to_bytes()))
    for span in chunk_spans(len(raw) // 4, chunk_size, include_partial=True):
        key = _hash(_SEGMENT_TAG, prev + raw[4 * span.start: 4 * span.end])
        keys.append(key)
        prev = bytes.fromhex(key)
    return keys


def _hash(tag: bytes, data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16, person=tag).hexdigest()


def model_name_from_path(model_path: str) -> str:
    """The fingerprint's model name for a served model: the last path component.

    SGLang, vLLM and the CLI all name a model this way, so the same checkpoint
    gives the same keys whichever engine (or host directory) serves it.
    """
    name = str(model_path).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    if not name:
        raise ValueError(f"model path {model_path!r} has no name component")
    return name
