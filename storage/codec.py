"""Payload codecs: byte-shuffle, then independent compressed blocks.

KV values are floats whose high bytes (sign, exponent) repeat far more than
their low bytes. Shuffling groups byte ``j`` of every element together, which
is what lets LZ4 compress bf16 KV at all (1.00x plain, about 1.2x shuffled).

The shuffled bytes are cut into ``BLOCK_BYTES`` blocks, each compressed as one
standard, self-contained frame (LZ4 frame or zstd frame), so a thread pool can
compress and decompress blocks in parallel (python-lz4 and zstandard release
the GIL). The payload is the concatenation of the frames; the header records
each frame's compressed length.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Callable, NamedTuple

import lz4.frame
import numpy as np
import zstandard

# 1 MiB blocks: on a 16-core host, 16 threads reached 1.7 GB/s compress and
# 2.0 GB/s decompress with byte-shuffled bf16; 64 KiB blocks halved that.
BLOCK_BYTES = 1 << 20
_ZSTD_LEVEL = 1


class Encoded(NamedTuple):
    data: bytes
    block_sizes: list[int]  # compressed length of each frame, in order


def _lz4_compress(block: bytes) -> bytes:
    return lz4.frame.compress(block, compression_level=0, store_size=True)


def _lz4_decompress(frame: bytes) -> bytes:
    return lz4.frame.decompress(frame)


def _zstd_compress(block: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(block)


def _zstd_decompress(frame: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(frame)


def _identity(block: bytes) -> bytes:
    return bytes(block)  # a frame of the "none" codec is the block itself


_CODECS: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    "lz4": (_lz4_compress, _lz4_decompress),
    "zstd": (_zstd_compress, _zstd_decompress),
    "none": (_identity, _identity),
}


def codec_names() -> tuple[str, ...]:
    return tuple(_CODECS)


def _codec(name: str) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    try:
        return _CODECS[name]
    except KeyError:
        raise ValueError(f"codec {name!r} is unknown; allowed: {sorted(_CODECS)}") from None


def shuffle(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """[n*itemsize] uint8 -> [itemsize * n] uint8: plane j holds byte j of every element.

    Strided numpy copies: 1.3 GB/s on one core here, against 0.07 GB/s for a
    torch transpose of a uint8 [n, itemsize] view.
    """
    if itemsize == 1:
        return raw
    n = raw.size // itemsize
    out = np.empty(raw.size, np.uint8)
    for j in range(itemsize):
        out[j * n:(j + 1) * n] = raw[j::itemsize]
    return out


def unshuffle(planes: np.ndarray, itemsize: int) -> np.ndarray:
    """Inverse of ``shuffle``."""
    if itemsize == 1:
        return planes
    n = planes.size // itemsize
    out = np.empty(planes.size, np.uint8)
    for j in range(itemsize):
        out[j::itemsize] = planes[j * n:(j + 1) * n]
    return out


def _map(pool: Executor | None, fn: Callable, items: list) -> list:
    if pool is None or len(items) <= 1:
        return [fn(x) for x in items]
    return list(pool.map(fn, items))


def encode(raw: np.ndarray, codec: str, shuffle_itemsize: int, pool: Executor | None = None) -> Encoded:
    """Compress a flat uint8 array. ``shuffle_itemsize`` 1 means no shuffle."""
    compress, _ = _codec(codec)
    view = memoryview(shuffle(raw, shuffle_itemsize))
    blocks = [view[i:i + BLOCK_BYTES] for i in range(0, len(view), BLOCK_BYTES)] or [view[:0]]
    frames = _map(pool, compress, blocks)
    return Encoded(b"".join(frames), [len(f) for f in frames])


def decode(data: bytes | memoryview, block_sizes: list[int], raw_len: int, codec: str,
           shuffle_itemsize: int, pool: Executor | None = None) -> np.ndarray:
    """Inverse of ``encode``: a flat uint8 array of ``raw_len`` bytes.

    Raises ValueError when the frames do not decode to exactly ``raw_len`` bytes.
    """
    _, decompress = _codec(codec)
    view = memoryview(data)
    if sum(block_sizes) != len(view):
        raise ValueError(f"payload is {len(view)} bytes, frames claim {sum(block_sizes)}")
    frames, offset = [], 0
    for size in block_sizes:
        frames.append(view[offset:offset + size])
        offset += size
    try:
        out = b"".join(_map(pool, decompress, frames))
    except (RuntimeError, zstandard.ZstdError) as e:  # lz4 raises RuntimeError on a bad frame
        raise ValueError(f"payload does not decompress: {e}") from e
    if len(out) != raw_len:
        raise ValueError(f"payload decodes to {len(out)} bytes, header says {raw_len}")
    return unshuffle(np.frombuffer(out, np.uint8), shuffle_itemsize)
