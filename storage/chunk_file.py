"""The on-disk (and remote) byte format of one chunk. Spec: docs/disk_format.md.

    offset 0   8 bytes   magic b"LMCSGLKV"
    offset 8   4 bytes   header length N, uint32 little-endian
    offset 12  N bytes   msgpack map (the header, fields below)
    offset 12+N          payload: concatenated compressed frames

A blob that fails any check decodes to ``CorruptChunk``; nothing partial is
ever returned as KV.
"""

from __future__ import annotations

import struct
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch
import xxhash

from . import codec as codec_mod

MAGIC = b"LMCSGLKV"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sI")
_MAX_HEADER = 64 << 20  # the token ids of a chunk are far below this

DTYPES = {  # the KV dtypes a chunk may hold, by name
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}


class CorruptChunk(ValueError):
    """A blob is not a valid chunk file, or not the chunk it claims to be."""


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    key: str
    fingerprint: dict[str, Any]
    token_ids: bytes  # int32 little-endian
    start_pos: int  # position of the chunk's first token when it was computed
    dtype: str
    shape: tuple[int, ...]
    codec: str
    shuffle: int  # bytes per element that were shuffled; 1 = none
    raw_len: int
    block_sizes: tuple[int, ...]
    checksum: str  # xxh3-64 of the raw (unshuffled, uncompressed) bytes, hex
    created: float
    version: int = FORMAT_VERSION

    def to_msgpack(self) -> bytes:
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields["shape"] = list(self.shape)
        fields["block_sizes"] = list(self.block_sizes)
        return msgpack.packb(fields, use_bin_type=True)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) // 4


def checksum(raw: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(raw)


def encode_chunk(key: str, fingerprint: dict[str, Any], token_ids: bytes, kv: torch.Tensor, *,
                 codec: str, byte_shuffle: bool, start_pos: int = 0,
                 pool: Executor | None = None) -> bytes:
    """One chunk tensor (any CPU dtype/shape) to a self-describing blob."""
    kv = kv.contiguous()
    raw = kv.view(-1).view(torch.uint8).numpy()  # [nbytes]
    itemsize = kv.element_size() if byte_shuffle else 1
    enc = codec_mod.encode(raw, codec, itemsize, pool)
    header = ChunkHeader(
        key=key, fingerprint=fingerprint, token_ids=token_ids, start_pos=start_pos,
        dtype=str(kv.dtype).removeprefix("torch."), shape=tuple(kv.shape), codec=codec,
        shuffle=itemsize, raw_len=raw.size, block_sizes=tuple(enc.block_sizes),
        checksum=checksum(raw), created=time.time())
    packed = header.to_msgpack()
    return _PREAMBLE.pack(MAGIC, len(packed)) + packed + enc.data


def read_header(blob: bytes | memoryview) -> tuple[ChunkHeader, int]:
    """Parse the header; returns it and the payload offset. Raises CorruptChunk."""
    view = memoryview(blob)
    if len(view) < _PREAMBLE.size:
        raise CorruptChunk(f"blob of {len(view)} bytes is shorter than the preamble")
    magic, hlen = _PREAMBLE.unpack_from(view)
    if magic != MAGIC:
        raise CorruptChunk(f"bad magic {bytes(magic)!r}")
    if hlen > _MAX_HEADER or _PREAMBLE.size + hlen > len(view):
        raise CorruptChunk(f"header length {hlen} exceeds the blob")
    try:
        fields = msgpack.unpackb(view[_PREAMBLE.size:_PREAMBLE.size + hlen], raw=False)
        if fields.get("version") != FORMAT_VERSION:
            raise CorruptChunk(f"format version {fields.get('version')!r}, this reader knows {FORMAT_VERSION}")
        fields["shape"] = tuple(fields["shape"])
        fields["block_sizes"] = tuple(fields["block_sizes"])
        header = ChunkHeader(**fields)
    except CorruptChunk:
        raise
    except Exception as e:  # msgpack errors, missing or extra fields
        raise CorruptChunk(f"unreadable header: {e}") from e
    return header, _PREAMBLE.size + hlen


def decode_chunk(blob: bytes | memoryview, *, key: str, token_ids: bytes | None = None,
                 fingerprint: dict[str, Any] | None = None,
                 pool: Executor | None = None) -> tuple[ChunkHeader, torch.Tensor]:
    """Verify and decode a blob into (header, CPU tensor). Raises CorruptChunk.

    Checks: magic, version, header shape, the key, the fingerprint and token ids
    when given (a guard against hash collisions and misplaced files), payload
    length, decompressed length and the checksum.
    """
    header, offset = read_header(blob)
    if header.key != key:
        raise CorruptChunk(f"file holds key {header.key}, expected {key}")
    if fingerprint is not None and header.fingerprint != fingerprint:
        raise CorruptChunk("fingerprint differs from the model's")
    if token_ids is not None and header.token_ids != token_ids:
        raise CorruptChunk("token ids differ from the request's")
    dtype = DTYPES.get(header.dtype)
    numel = 1
    for d in header.shape:
        numel *= d
    if dtype is None or numel * dtype.itemsize != header.raw_len:
        raise CorruptChunk(f"dtype {header.dtype} and shape {header.shape} disagree with {header.raw_len} bytes")
    try:
        raw = codec_mod.decode(memoryview(blob)[offset:], list(header.block_sizes), header.raw_len,
                               header.codec, header.shuffle, pool)
    except ValueError as e:
        raise CorruptChunk(str(e)) from e
    if checksum(raw) != header.checksum:
        raise CorruptChunk("checksum mismatch")
    # A writable copy is made by unshuffle; with shuffle=1 the array views the blob, so copy.
    flat = torch.from_numpy(raw if header.shuffle > 1 else raw.copy())
    return header, flat.view(dtype).view(header.shape)
