"""The on-disk (and remote) byte format of one chunk. Spec: docs/disk_format.md.

    offset 0   8 bytes   magic b"LMCSGLKV"
    offset 8   4 bytes   header length N, uint32 little-endian
    offset 12  N bytes   msgpack map (the header, fields below)
    offset 12+N          payload: concatenated compressed frames

A blob that fails any check decodes to ``CorruptChunk``; nothing partial is
ever returned as KV, and no other exception escapes ``read_header`` or
``decode_chunk``. Every size is checked before anything is decompressed, so a
hostile blob costs at most its declared raw size (itself capped) in memory.
"""

from __future__ import annotations

import math
import re
import struct
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgpack
import numpy as np
import torch
import xxhash

from . import codec as codec_mod

MAGIC = b"LMCSGLKV"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sI")
MAX_HEADER_BYTES = 1 << 20  # a 256-token chunk's header is ~1.2 KiB; this holds ~250k token ids
# The largest chunk a reader accepts: a 1024-token bf16 chunk of a 126-layer,
# 8-KV-head, 128-dim model (Llama 3.1 405B at TP 1) is 504 MiB.
MAX_RAW_BYTES = 2 << 30

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


def max_blob_bytes(raw_len: int) -> int:
    """The longest valid blob holding ``raw_len`` raw bytes, with any codec and header.

    A file, Redis value or archive member longer than this for the layout's
    chunk bytes is corrupt; readers can cap their reads with it.
    """
    return _PREAMBLE.size + MAX_HEADER_BYTES + codec_mod.max_payload_bytes(raw_len)


_FIELDS = frozenset(ChunkHeader.__slots__)
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_LAYOUT_KEYS = ("kv_dtype", "num_layers", "num_kv_heads", "head_dim")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise CorruptChunk(f"header: {what}")


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _int_list(value: Any, lo: int, hi: int, max_len: int) -> bool:
    return type(value) is list and len(value) <= max_len and all(_is_int(v, lo, hi) for v in value)


def _check_scalars(f: dict) -> None:
    _require(_is_int(f["version"], FORMAT_VERSION, FORMAT_VERSION),
             f"version {f['version']!r} is not {FORMAT_VERSION}, the one this reader knows")
    _require(type(f["key"]) is str, "key is not a string")
    fp = f["fingerprint"]
    _require(type(fp) is dict and all(type(k) is str and (v is None or type(v) in (str, int, float, bool))
                                      for k, v in fp.items()), "fingerprint is not a map of scalars")
    _require(type(f["token_ids"]) is bytes and len(f["token_ids"]) % 4 == 0, "token_ids is not int32 bytes")
    _require(_is_int(f["start_pos"], 0, 2**31 - 1), f"start_pos {f['start_pos']!r} is not in [0, 2^31)")
    _require(type(f["dtype"]) is str and f["dtype"] in DTYPES, f"dtype {f['dtype']!r} is unknown")
    _require(type(f["codec"]) is str and f["codec"] in codec_mod.codec_names(), f"codec {f['codec']!r} is unknown")
    _require(type(f["checksum"]) is str and _HEX16.match(f["checksum"]) is not None,
             "checksum is not 16 hex digits")
    _require(type(f["created"]) in (int, float) and math.isfinite(f["created"]), "created is not a finite time")


def _check_sizes(f: dict) -> None:
    """shape x dtype = raw_len <= MAX_RAW_BYTES, shuffle fits the dtype, frames fit the blocks."""
    _require(_is_int(f["raw_len"], 0, 2**63), f"raw_len {f['raw_len']!r} is not a byte count")
    _require(f["raw_len"] <= MAX_RAW_BYTES, f"raw_len {f['raw_len']} exceeds the cap of {MAX_RAW_BYTES} bytes")
    _require(_int_list(f["shape"], 0, MAX_RAW_BYTES, 8) and len(f["shape"]) >= 1, f"shape {f['shape']!r} is malformed")
    itemsize = DTYPES[f["dtype"]].itemsize
    _require(math.prod(f["shape"]) * itemsize == f["raw_len"],
             f"shape {f['shape']} of {f['dtype']} disagrees with raw_len {f['raw_len']}")
    _require(type(f["shuffle"]) is int and f["shuffle"] in (1, itemsize),
             f"shuffle {f['shuffle']!r} is neither 1 nor the {f['dtype']} size {itemsize}")
    blocks = len(codec_mod.block_lengths(f["raw_len"]))
    _require(_int_list(f["block_sizes"], 0, 2**63, blocks),
             f"block_sizes is not one byte count for each of the {blocks} blocks")
    try:
        codec_mod.check_frames(f["block_sizes"], f["raw_len"], f["codec"])
    except ValueError as e:
        raise CorruptChunk(str(e)) from None


def _parse_fields(packed: memoryview) -> ChunkHeader:
    try:
        fields = msgpack.unpackb(packed, raw=False)
    except Exception as e:  # any msgpack failure: bad bytes, bad utf-8, too deep
        raise CorruptChunk(f"unreadable header: {e}") from e
    _require(type(fields) is dict, "not a map")
    _require(fields.keys() == _FIELDS, f"field names differ: missing {sorted(_FIELDS - fields.keys())}, "
                                       f"unknown {sorted(map(str, fields.keys() - _FIELDS))}")
    _check_scalars(fields)
    _check_sizes(fields)
    return ChunkHeader(**{**fields, "shape": tuple(fields["shape"]), "block_sizes": tuple(fields["block_sizes"])})


def read_header(blob: bytes | memoryview) -> tuple[ChunkHeader, int]:
    """Parse and check the header; returns it and the payload offset. Raises CorruptChunk.

    Every field has its type and range checked, and the frame sizes are checked
    against the blocks that ``raw_len`` needs, so nothing after this can fail on
    a malformed header.
    """
    view = memoryview(blob)
    if len(view) < _PREAMBLE.size:
        raise CorruptChunk(f"blob of {len(view)} bytes is shorter than the preamble")
    magic, hlen = _PREAMBLE.unpack_from(view)
    if magic != MAGIC:
        raise CorruptChunk(f"bad magic {bytes(magic)!r}")
    if hlen > MAX_HEADER_BYTES or _PREAMBLE.size + hlen > len(view):
        raise CorruptChunk(f"header length {hlen} exceeds the blob or the cap of {MAX_HEADER_BYTES}")
    return _parse_fields(view[_PREAMBLE.size:_PREAMBLE.size + hlen]), _PREAMBLE.size + hlen


def split_blob(blob: bytes) -> tuple[dict, bytes]:
    """A valid blob as (its raw header fields, its payload): for tools that rewrite headers
    (fuzzers, hostile-input tests). Raises CorruptChunk like ``read_header``."""
    _, offset = read_header(blob)
    return msgpack.unpackb(blob[_PREAMBLE.size:offset], raw=False), blob[offset:]


def pack_blob(fields: dict, payload: bytes) -> bytes:
    """A blob from raw header fields and a payload, unchecked: ``split_blob``'s inverse."""
    header = msgpack.packb(fields, use_bin_type=True)
    return _PREAMBLE.pack(MAGIC, len(header)) + header + payload


def read_stream_header(stream: BinaryIO) -> tuple[ChunkHeader, bytes]:
    """(header, the bytes read: preamble and header) from a stream at a blob's start;
    reads at most ``MAX_HEADER_BYTES`` + 12 bytes. Raises CorruptChunk."""
    pre = stream.read(_PREAMBLE.size)
    hlen = _PREAMBLE.unpack(pre)[1] if len(pre) == _PREAMBLE.size else 0
    head = pre + stream.read(min(hlen, MAX_HEADER_BYTES))
    return read_header(head)[0], head


def read_chunk(stream: BinaryIO, size: int) -> tuple[ChunkHeader, bytearray]:
    """Read a blob of ``size`` bytes from ``stream``, header first: a blob longer than
    ``max_blob_bytes`` of its header's raw size is refused before its payload is read.
    Raises CorruptChunk (errors of the stream itself, such as OSError, pass through)."""
    header, head = read_stream_header(stream)
    offset = len(head)
    bound = max_blob_bytes(header.raw_len)
    if size > bound:
        raise CorruptChunk(f"blob of {size} bytes exceeds the bound of {bound} for {header.raw_len} raw bytes")
    blob = bytearray(max(size, offset))
    blob[:offset] = head
    view, filled = memoryview(blob), offset
    while filled < size:
        n = stream.readinto(view[filled:])
        if not n:
            raise CorruptChunk(f"blob ends at {filled} of {size} bytes")
        filled += n
    return header, blob


def _check_identity(header: ChunkHeader, key: str, token_ids: bytes | None,
                    fingerprint: dict[str, Any] | None, max_raw_len: int | None) -> None:
    if header.key != key:
        raise CorruptChunk(f"file holds key {header.key}, expected {key}")
    if fingerprint is not None and header.fingerprint != fingerprint:
        raise CorruptChunk("fingerprint differs from the model's")
    if token_ids is not None and header.token_ids != token_ids:
        raise CorruptChunk("token ids differ from the request's")
    if max_raw_len is not None and header.raw_len > max_raw_len:
        raise CorruptChunk(f"raw_len {header.raw_len} exceeds the caller's bound of {max_raw_len}")
    expected = expected_shape(header.fingerprint, header.num_tokens)
    if expected is not None and (header.shape != expected or header.dtype != header.fingerprint["kv_dtype"]):
        raise CorruptChunk(f"shape {header.shape} {header.dtype} is not the fingerprint's layout {expected}")


def expected_shape(fingerprint: dict[str, Any], num_tokens: int) -> tuple[int, ...] | None:
    """[L, P, T, H, D] of a model fingerprint (P = 1 with MLA, else 2); None when the
    fingerprint lacks the layout fields (then only shape x dtype = raw_len is checked)."""
    if not all(k in fingerprint for k in _LAYOUT_KEYS):
        return None
    dims = [fingerprint[k] for k in _LAYOUT_KEYS[1:]]
    _require(all(_is_int(d, 0, MAX_RAW_BYTES) for d in dims), f"fingerprint dims {dims} are not sizes")
    layers, heads, head_dim = dims
    return (layers, 1 if fingerprint.get("use_mla") else 2, num_tokens, heads, head_dim)


def decode_chunk(blob: bytes | memoryview, *, key: str, token_ids: bytes | None = None,
                 fingerprint: dict[str, Any] | None = None, max_raw_len: int | None = None,
                 pool: Executor | None = None) -> tuple[ChunkHeader, torch.Tensor]:
    """Verify and decode a blob into (header, CPU tensor). Raises CorruptChunk, only.

    Checks, all before decompressing: magic, version, every header field's type
    and range, the key, the fingerprint and token ids when given (a guard
    against hash collisions and misplaced files), ``raw_len`` against
    ``max_raw_len`` (the caller's chunk bytes) and the fingerprint's layout, the
    frame count and each frame's bound, and the payload length. Then each frame
    must decompress to exactly its block, and the checksum must match.
    """
    header, offset = read_header(blob)
    _check_identity(header, key, token_ids, fingerprint, max_raw_len)
    try:
        raw = codec_mod.decode(memoryview(blob)[offset:], list(header.block_sizes), header.raw_len,
                               header.codec, header.shuffle, pool)
    except Exception as e:  # invariant: any failure on a blob's bytes is a miss, never a crash
        raise CorruptChunk(str(e) if isinstance(e, ValueError) else f"payload does not decode: {e!r}") from e
    if checksum(raw) != header.checksum:
        raise CorruptChunk("checksum mismatch")
    # [raw_len] uint8, a fresh array that owns its memory (numpy gives an empty one stride 0)
    flat = torch.from_numpy(raw) if raw.size else torch.empty(0, dtype=torch.uint8)
    return header, flat.view(DTYPES[header.dtype]).view(header.shape)
