"""The fault campaign's decoder fuzzing (see fault_campaign.py): a seeded, structure-aware mutator.

Bases are valid blobs (lz4, zstd, stored; full and partial chunks). Each try
mutates one: bit flips, truncation, extension, splices, a preamble with another
header length, or a header field replaced, dropped or added with a hostile
value (huge, negative, wrong type, NaN, deep nesting), repacked consistently.
The result goes through ``decode_chunk`` (as the store calls it: key, token
ids, fingerprint and the layout's chunk bytes as ``max_raw_len``) and, for a
sample, through ``read_chunk`` (the bounded stream read of imports).

Outcomes: a ``CorruptChunk`` (a miss), or a decode equal to the base's KV (the
mutation only touched a field such as ``created``); anything else is a failure:
another exception (a crash), a decode that differs (wrong KV), a try using more
than ``SLOW_S`` of CPU (a hang; CPU time, because wall time on a shared host
also counts other processes), or a traced allocation peak above ``alloc_bound``.
"""

from __future__ import annotations

import io
import math
import random
import struct
import time
import tracemalloc

from lmcache_sgl.storage.chunk_file import (CorruptChunk, decode_chunk, encode_chunk, pack_blob, read_chunk, read_header,
                                           split_blob)

SLOW_S = 1.0
TRACE_EVERY = 25  # tracemalloc slows every allocation: trace one try in this many
_HOSTILE = (0, -1, 1, 2**31, 2**63 - 1, -2**63, 2**64 - 1, 1 << 40, 3.5, math.nan, math.inf, None, True, "",
            "x" * 300, "bfloat16", "lz4", "zstd", b"", b"\xff" * 37, [], [1] * 9, [2**40, 2], {"a": 1},
            [[[[[]]]]], {"k": {"k": {"k": [1, 2]}}})


def alloc_bound(blob_len: int, max_raw_len: int) -> int:
    """What one decode may allocate: the decoded chunk, its unshuffle copy and the
    output tensor, plus a small multiple of the blob (msgpack objects of its header)."""
    return 3 * max_raw_len + 16 * blob_len + (64 << 10)


def _bases(ref, layout) -> list[tuple[bytes, int]]:
    fp = layout.fingerprint.to_dict()
    out = []
    for i, (codec, shuffle) in enumerate((("lz4", True), ("zstd", True), ("none", False), ("lz4", False))):
        for j in (i + 1, 7 * i):  # a full chunk, and a partial one (Reference: index % 7 == 0)
            tok = struct.pack(f"<{ref.num_tokens(j)}i", *ref.tokens(j))
            out.append((encode_chunk(ref.key(j), fp, tok, ref.kv(j), codec=codec, byte_shuffle=shuffle), j))
    return out


def _mutate_header(blob: bytes, rng: random.Random) -> bytes:
    fields, payload = split_blob(blob)
    name = rng.choice(sorted(fields))
    roll = rng.random()
    if roll < 0.7:
        fields[name] = rng.choice(_HOSTILE)
    elif roll < 0.8:
        del fields[name]
    elif roll < 0.9:
        fields[rng.choice(("extra", 7, "keyz"))] = rng.choice(_HOSTILE)
    else:  # a plausible but wrong value of the right type
        value = fields[name]
        if isinstance(value, int) and not isinstance(value, bool):
            fields[name] = value + rng.choice((-1, 1, 2, 1 << 20))
        elif isinstance(value, list) and value:
            fields[name] = [v * rng.choice((2, 0)) for v in value] if rng.random() < 0.5 else value[:-1]
    return pack_blob(fields, payload)


def _mutate_bytes(blob: bytes, rng: random.Random, other: bytes) -> bytes:
    roll = rng.random()
    b = bytearray(blob)
    if roll < 0.35:
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
    elif roll < 0.5:
        del b[rng.randrange(len(b)):]
    elif roll < 0.6:
        b += rng.randbytes(rng.randint(1, 4096))
    elif roll < 0.7:  # another base's payload behind this header
        b = bytearray(blob[:read_header(blob)[1]] + other[read_header(other)[1]:])
    elif roll < 0.8:
        b[8:12] = struct.pack("<I", rng.choice((0, 1, len(b), len(b) - 11, 2**20, 2**32 - 1, rng.randrange(2**32))))
    elif roll < 0.9:
        b = bytearray(b"LMCSGLKV" + rng.randbytes(rng.randint(0, 2048)))
    else:
        pos = rng.randrange(len(b))
        b[pos:pos + rng.randint(1, 64)] = rng.randbytes(rng.randint(0, 64))
    return bytes(b)


def _one_try(blob: bytes, index: int, ref, layout, res, traced: bool) -> None:
    key, tok = ref.key(index), struct.pack(f"<{ref.num_tokens(index)}i", *ref.tokens(index))
    if traced:
        tracemalloc.start()
    start, cpu_start = time.perf_counter(), time.thread_time()
    try:
        _, kv = decode_chunk(blob, key=key, token_ids=tok, fingerprint=layout.fingerprint.to_dict(),
                             max_raw_len=layout.chunk_bytes)
        res.outcomes["decoded, same KV" if ref.verify(kv, index, res) else "decoded, WRONG KV"] += 1
    except CorruptChunk:
        res.outcomes["corrupt (miss)"] += 1
    except Exception as e:  # a crash: anything but CorruptChunk
        res.outcomes["crash"] += 1
        res.failures.append(f"decode raised {e!r}")
    took, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    res.outcomes["slowest try, wall (ms)"] = max(res.outcomes["slowest try, wall (ms)"], round(took * 1000, 1))
    res.outcomes["slowest try, CPU (ms)"] = max(res.outcomes["slowest try, CPU (ms)"], round(cpu * 1000, 1))
    res.check(cpu < SLOW_S, f"a decode took {cpu:.2f} s of CPU")
    if traced:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        res.outcomes["largest peak (KiB)"] = max(res.outcomes["largest peak (KiB)"], peak >> 10)
        res.check(peak <= alloc_bound(len(blob), layout.chunk_bytes),
                  f"a decode of a {len(blob)} byte blob allocated {peak} bytes")


def _stream_try(blob: bytes, res) -> None:
    """The bounded stream read refuses or returns at most the blob's own bytes."""
    try:
        _, got = read_chunk(io.BytesIO(blob), len(blob))
        res.check(len(got) <= len(blob), f"read_chunk returned {len(got)} bytes of a {len(blob)} byte blob")
    except CorruptChunk:
        pass
    except Exception as e:
        res.outcomes["crash"] += 1
        res.failures.append(f"read_chunk raised {e!r}")


def fuzz_decoder(res, ref, layout, tries: int, rng: random.Random) -> None:
    bases = _bases(ref, layout)
    for t in range(tries):
        blob, index = rng.choice(bases)
        mutated = _mutate_header(blob, rng) if rng.random() < 0.5 else _mutate_bytes(blob, rng, rng.choice(bases)[0])
        res.tries += 1
        _one_try(mutated, index, ref, layout, res, traced=t % TRACE_EVERY == 0)
        if t % 10 == 0:
            _stream_try(mutated, res)
    res.failures[:] = res.failures[:5]
