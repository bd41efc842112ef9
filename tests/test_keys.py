"""Keys: stable across processes and hash seeds, chained, position-free content keys."""

import hashlib
import os
import struct
import subprocess
import sys

import pytest

from lmcache_sgl.keys import ModelFingerprint, chunk_spans, content_key, prefix_keys

FP = ModelFingerprint("golden-model", "bfloat16", num_layers=4, num_kv_heads=2, head_dim=64)
TOKENS = list(range(1000, 1040))



def _keys_in_subprocess(seed: str) -> str:
    code = ("from lmcache_sgl.keys import ModelFingerprint, prefix_keys\n"
            "fp = ModelFingerprint('golden-model', 'bfloat16', num_layers=4, num_kv_heads=2, head_dim=64)\n"
            "print(','.join(prefix_keys(fp, list(range(1000, 1040)), 16, include_partial=True)))")
    env = {**os.environ, "PYTHONHASHSEED": seed}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_stable_across_processes_and_hash_seeds():
    here = ",".join(prefix_keys(FP, TOKENS, 16, include_partial=True))
    assert {_keys_in_subprocess("0"), _keys_in_subprocess("12345"), here} == {here}


def test_golden_values():
    keys = prefix_keys(FP, TOKENS, 16, include_partial=True)
    # Recorded when key format version 2 was fixed (v1: 636eb4df..., orphaned by the model identity
    # change): a change here orphans every cache on disk.
    assert keys == [
        "92fbaebddc00cce0bcf5610cf09c7f8b",
        "30459e5e3601ae8c452498b2082e0853",
        "88e3d278bd018cd3496d3b692fba80a9",
    ]
    assert content_key(FP, TOKENS[:16]) == "745560d147f154d08c03622a4068f878"


def test_keys_follow_the_documented_formula():
    """docs/disk_format.md: k_i = blake2b-128(k_{i-1} || int32le(chunk), person="lmcsgl-prefix")."""
    def h(data, tag):
        return hashlib.blake2b(data, digest_size=16, person=tag)
    prev = h(FP.to_bytes(), b"lmcsgl-prefix").digest()
    expected = []
    for start in (0, 16, 32):
        prev = h(prev + struct.pack(f"<{len(TOKENS[start:start + 16])}i", *TOKENS[start:start + 16]),
                 b"lmcsgl-prefix").digest()
        expected.append(prev.hex())
    assert prefix_keys(FP, TOKENS, 16, include_partial=True) == expected


def test_chained_keys_depend_on_everything_before():
    base = prefix_keys(FP, TOKENS, 8)
    changed = prefix_keys(FP, [TOKENS[0] + 1] + TOKENS[1:], 8)
    assert all(a != b for a, b in zip(base, changed))  # an early token changes every later key
    tail_changed = prefix_keys(FP, TOKENS[:-1] + [7], 8)
    assert tail_changed[:-1] == base[:-1] and tail_changed[-1] != base[-1]


def test_fingerprint_fields_change_keys():
    other_rank = ModelFingerprint("golden-model", "bfloat16", 4, 2, 64, tp_rank=1, tp_size=2)
    other_dtype = ModelFingerprint("golden-model", "float16", 4, 2, 64)
    keys = {tuple(prefix_keys(fp, TOKENS, 16)) for fp in (FP, other_rank, other_dtype)}
    assert len(keys) == 3


def test_partial_chunk_has_its_own_key():
    full = prefix_keys(FP, TOKENS, 16)
    with_partial = prefix_keys(FP, TOKENS, 16, include_partial=True)
    assert len(full) == 2 and len(with_partial) == 3 and with_partial[:2] == full
    assert with_partial[2] not in full


def test_content_key_is_position_free_and_distinct_from_prefix_key():
    doc = TOKENS[:16]
    assert content_key(FP, doc) == content_key(FP, list(doc))
    assert content_key(FP, doc) != prefix_keys(FP, doc, 16)[0]
    assert content_key(FP, doc) != content_key(FP, doc[::-1])


def test_chunk_spans_cover_the_prompt():
    spans = chunk_spans(40, 16, include_partial=True)
    assert [(s.start, s.end) for s in spans] == [(0, 16), (16, 32), (32, 40)]
    assert len(chunk_spans(40, 16, include_partial=False)) == 2
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_spans(4, 0, False)


def test_bad_fingerprint_and_tokens():
    with pytest.raises(ValueError, match="tp_rank"):
        ModelFingerprint("m", "bfloat16", 1, 1, 1, tp_rank=2, tp_size=2)
    with pytest.raises(ValueError, match="int32"):
        prefix_keys(FP, [2**40] * 16, 16)
