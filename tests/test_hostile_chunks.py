"""Hostile chunk files (issue #10 items 3 and 4, issue #13): a crafted blob is a
bounded-memory CorruptChunk, never another exception, never a large allocation."""

from __future__ import annotations

import io
import math
import struct
import tarfile
import tracemalloc

import lz4.frame
import pytest
import torch
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import prompt_chunks, store_config
from lmcache_sgl import TieredStore
from lmcache_sgl.cache_admin import import_archive, verify
from lmcache_sgl.keys import token_bytes
from lmcache_sgl.storage.chunk_file import CorruptChunk, decode_chunk, encode_chunk, pack_blob, read_header, split_blob

FP = {"model_name": "m", "kv_dtype": "bfloat16"}
TOK = token_bytes(range(100, 116))
KEY = "0123456789abcdef0123456789abcdef"
RAW = 256 << 10  # claimed raw bytes of the crafted bombs
MIB = 1 << 20


def _kv(shape=(2, 2, 16, 2, 16), dtype=torch.bfloat16, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _bomb_fields(codec: str, frames: list[bytes], raw_len: int = RAW) -> dict:
    """Header fields claiming ``raw_len`` bf16 bytes in ``frames``; consistent in every other way."""
    return {"key": KEY, "fingerprint": FP, "token_ids": TOK, "start_pos": 0, "dtype": "bfloat16",
            "shape": [raw_len // 2], "codec": codec, "shuffle": 1, "raw_len": raw_len,
            "block_sizes": [len(f) for f in frames], "checksum": "0" * 16, "created": 1.0, "version": 1}


def _zstd_lying_content_size(claimed: int, real: int) -> bytes:
    """A zstd frame whose header says ``claimed`` bytes but whose blocks hold ``real`` bytes."""
    big = zstandard.ZstdCompressor(level=1).compress(b"\x07" * real)
    assert big[4] == 0x80 and zstandard.frame_header_size(big) == 10  # 4-byte size after the window byte
    lying = big[:6] + struct.pack("<I", claimed) + big[10:]
    assert zstandard.frame_content_size(lying) == claimed
    return lying


def _lz4_with_content_size(size: int) -> bytes:
    """An LZ4 frame of 64 KiB whose header (checksum fixed up) claims ``size`` bytes."""
    frame = bytearray(lz4.frame.compress(b"\x07" * (64 << 10), store_size=True))
    assert frame[4] & 0x08  # content size present: 8 bytes after FLG and BD
    frame[6:14] = struct.pack("<Q", size)
    frame[14] = (xxhash.xxh32_intdigest(bytes(frame[4:14])) >> 8) & 0xFF
    return bytes(frame)


def _peak(fn) -> tuple[BaseException | None, int]:
    """(the exception ``fn`` raised or None, peak traced bytes while it ran)."""
    tracemalloc.start()
    try:
        fn()
        raised = None
    except BaseException as e:  # noqa: BLE001 - the caller asserts on the type
        raised = e
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return raised, peak


BOMBS = {
    "lz4-100x": lambda: ("lz4", [lz4.frame.compress(b"\x07" * (100 * RAW), store_size=True)]),
    "lz4-no-size-100x": lambda: ("lz4", [lz4.frame.compress(b"\x07" * (100 * RAW), store_size=False)]),
    "zstd-100x": lambda: ("zstd", [zstandard.ZstdCompressor(level=1).compress(b"\x07" * (100 * RAW))]),
    "zstd-lying-size": lambda: ("zstd", [_zstd_lying_content_size(RAW, 100 * RAW)]),
    "lz4-claims-1tib": lambda: ("lz4", [_lz4_with_content_size(1 << 40)]),
    "lz4-extra-frames": lambda: ("lz4", [lz4.frame.compress(b"\x07" * RAW)] * 20),
}


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_bomb_is_corrupt_within_the_declared_size(bomb):
    """A payload that expands past the header's raw size is rejected without ever holding it:
    peak memory stays within a few times the declared size, not the 20-100x expansion."""
    codec, frames = BOMBS[bomb]()
    blob = pack_blob(_bomb_fields(codec, frames), b"".join(frames))
    raised, peak = _peak(lambda: decode_chunk(blob, key=KEY))
    assert isinstance(raised, CorruptChunk), repr(raised)
    assert peak < 6 * RAW, f"decode of a {len(blob)} byte bomb peaked at {peak} bytes"


def test_raw_len_above_the_callers_bound_is_rejected_before_decompressing(monkeypatch):
    """``max_raw_len`` (the layout's chunk bytes) rejects a larger claim before any frame is read."""
    from lmcache_sgl.storage import codec

    blob = encode_chunk(KEY, FP, TOK, _kv(), codec="lz4", byte_shuffle=True)
    raw_len = read_header(blob)[0].raw_len
    monkeypatch.setattr(codec, "decode", lambda *a, **k: pytest.fail("decompressed an oversized claim"))
    with pytest.raises(CorruptChunk, match="exceeds"):
        decode_chunk(blob, key=KEY, max_raw_len=raw_len - 1)


def test_shape_must_match_the_fingerprints_layout():
    """With a full model fingerprint, a header shape that disagrees with [L, P, T, H, D] is corrupt,
    even when shape, dtype and raw_len agree with each other."""
    fp = {**FP, "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "use_mla": False}
    good = encode_chunk(KEY, fp, TOK, _kv(), codec="lz4", byte_shuffle=True)
    decode_chunk(good, key=KEY, fingerprint=fp, token_ids=TOK)
    wrong = encode_chunk(KEY, fp, TOK, _kv((4, 2, 16, 1, 16)), codec="lz4", byte_shuffle=True)
    with pytest.raises(CorruptChunk, match="layout"):
        decode_chunk(wrong, key=KEY, fingerprint=fp, token_ids=TOK)


@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
def test_max_blob_bytes_bounds_every_real_encoding(codec):
    """Incompressible data of sizes around the block boundary fits ``max_blob_bytes``; a frame
    longer than its block's bound is corrupt before decompressing."""
    from lmcache_sgl.storage.chunk_file import max_blob_bytes

    gen = torch.Generator().manual_seed(1)
    for raw_len in (2, 4094, MIB - 2, MIB, MIB + 2, 2 * MIB + 6):
        kv = torch.randint(-128, 127, (raw_len,), generator=gen, dtype=torch.int8).view(torch.uint8)
        blob = encode_chunk(KEY, FP, TOK, kv.view(torch.float16), codec=codec, byte_shuffle=True)
        assert len(blob) <= max_blob_bytes(raw_len)
    fields, payload = split_blob(encode_chunk(KEY, FP, TOK, _kv(), codec=codec, byte_shuffle=False))
    junk = payload + bytes(range(256)) * (fields["raw_len"] // 128)
    fields["block_sizes"] = [len(junk)]
    with pytest.raises(CorruptChunk, match="bound"):
        decode_chunk(pack_blob(fields, junk), key=KEY)


def test_claim_above_the_format_cap_is_corrupt():
    from lmcache_sgl.storage.chunk_file import MAX_RAW_BYTES

    raw_len = 2 * MAX_RAW_BYTES
    fields = _bomb_fields("zstd", [b"x"], raw_len=raw_len)
    fields["block_sizes"] = [1] * math.ceil(raw_len / MIB)
    blob = pack_blob(fields, b"x" * len(fields["block_sizes"]))
    raised, peak = _peak(lambda: decode_chunk(blob, key=KEY))
    assert isinstance(raised, CorruptChunk) and "exceeds" in str(raised)
    assert peak < 64 * MIB


# ---- item 4: type-valid but malformed headers -------------------------------------------------

BAD_VALUES = [None, True, -1, 0, 1, 3, 2**63 - 1, -(2**63), 1.5, float("nan"), float("inf"), "", "a",
              "bfloat16", b"", b"\x00\x01\x02", [], [1], ["a"], [-1], [0], [2**62, 2**62], [1.5],
              [[1]], {}, {"a": 1}, list(range(9))]


def _valid_parts(codec="lz4", shuffle=True, dtype=torch.bfloat16):
    kv = _kv(dtype=dtype)
    fields, payload = split_blob(encode_chunk(KEY, FP, TOK, kv, codec=codec, byte_shuffle=shuffle))
    return kv, fields, payload


def _correct_or_corrupt(blob: bytes, kv: torch.Tensor, **kw) -> str:
    """Decode must give CorruptChunk or exactly ``kv``; returns which."""
    try:
        _, out = decode_chunk(blob, key=KEY, **kw)
    except CorruptChunk:
        return "corrupt"
    assert out.dtype == kv.dtype and out.shape == kv.shape
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))
    return "decoded"


FIELDS = ["key", "fingerprint", "token_ids", "start_pos", "dtype", "shape", "codec", "shuffle", "raw_len",
          "block_sizes", "checksum", "created", "version"]


@pytest.mark.parametrize("field", FIELDS)
def test_every_bad_value_of_every_field_is_corrupt_or_exact(field):
    kv, fields, payload = _valid_parts()
    bad_values = BAD_VALUES + ([fields[field] + fields[field][-1:]] if isinstance(fields[field], list) else [])
    outcomes = set()
    for bad in bad_values:
        blob = pack_blob({**fields, field: bad}, payload)
        outcomes.add(_correct_or_corrupt(blob, kv))
        outcomes.add(_correct_or_corrupt(blob, kv, token_ids=TOK, fingerprint=FP))
    assert "corrupt" in outcomes
    missing = {k: v for k, v in fields.items() if k != field}
    assert _correct_or_corrupt(pack_blob(missing, payload), kv) == "corrupt"


@pytest.mark.parametrize("fields_patch", [{"shuffle": 0}, {"block_sizes": ["a"]}, {"dtype": [1]},
                                          {"shuffle": 3}, {"shuffle": -2}, {"shape": ["a", 2]},
                                          {"raw_len": "1"}, {"token_ids": "abc"}, {"extra": 1},
                                          {"codec": ["lz4"]}, {"block_sizes": [2**64 - 1]}])
def test_named_malformed_headers_are_corrupt(fields_patch):
    """The headers from issue #10 item 4 (ZeroDivisionError / TypeError before) are CorruptChunk."""
    kv, fields, payload = _valid_parts()
    with pytest.raises(CorruptChunk):
        decode_chunk(pack_blob({**fields, **fields_patch}, payload), key=KEY)


MUTATION = st.tuples(st.sampled_from(FIELDS + ["extra"]),
                     st.one_of(st.sampled_from(BAD_VALUES), st.integers(-(2**63), 2**64 - 1),
                               st.lists(st.integers(-(2**31), 2**33), max_size=6), st.text(max_size=8),
                               st.binary(max_size=8), st.just("<delete>")))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4),
       codec=st.sampled_from(["lz4", "zstd", "none"]), shuffle=st.booleans())
def test_random_header_mutations_are_corrupt_or_exact(mutations, codec, shuffle):
    kv, fields, payload = _valid_parts(codec, shuffle)
    for name, value in mutations:
        if value == "<delete>":
            fields.pop(name, None)
        else:
            fields[name] = value
    _correct_or_corrupt(pack_blob(fields, payload), kv, fingerprint=FP)


# ---- the store and the admin commands -------------------------------------------------------------

def _malform(path, **patch) -> None:
    fields, payload = split_blob(path.read_bytes())
    path.write_bytes(pack_blob({**fields, **patch}, payload))


def test_store_treats_a_malformed_header_as_a_quarantined_miss(layout, tmp_path):
    keys, toks, kvs = prompt_chunks(layout, 2)
    cfg = store_config(layout, host_chunks=0, disk_dir=tmp_path, disk_chunks=100)
    with TieredStore(cfg, layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
    victim = tmp_path / keys[1][:2] / f"{keys[1]}.kv"
    _malform(victim, shuffle=0)
    with TieredStore(cfg, layout) as store:
        got = store.get(keys, toks)
        assert len(got) == 1 and torch.equal(got[0].view(torch.uint8), kvs[0].view(torch.uint8))
        assert store.stats().corrupt_chunks == 1 and not victim.exists()
        assert store.lookup(keys).num_hits == 1


def _cache_dir(tmp_path, n=3):
    root = tmp_path / "cache"
    keys = [f"{i:02x}" + "ab" * 15 for i in range(n)]
    for i, key in enumerate(keys):
        (root / key[:2]).mkdir(parents=True, exist_ok=True)
        (root / key[:2] / f"{key}.kv").write_bytes(
            encode_chunk(key, FP, TOK, _kv(seed=i), codec="lz4", byte_shuffle=True))
    return root, keys


@pytest.mark.parametrize("patch", [{"shuffle": 0}, {"block_sizes": ["a"]}, {"dtype": [1]}])
def test_verify_reports_malformed_headers_and_continues(tmp_path, patch):
    root, keys = _cache_dir(tmp_path)
    _malform(root / keys[1][:2] / f"{keys[1]}.kv", **patch)
    report = verify(root, threads=2)
    assert report.checked == 3 and list(report.bad) == [keys[1]]
    assert (root / keys[0][:2] / f"{keys[0]}.kv").exists() and (root / keys[2][:2] / f"{keys[2]}.kv").exists()
    assert not (root / keys[1][:2] / f"{keys[1]}.kv").exists()


def _tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]], path) -> None:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _member(key: str, blob: bytes | None = None, **attrs) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(f"{key[:2]}/{key}.kv")
    for name, value in attrs.items():
        setattr(info, name, value)
    return info, blob


def test_import_rejects_malformed_headers_and_imports_the_rest(tmp_path):
    good = encode_chunk(KEY, FP, TOK, _kv(), codec="lz4", byte_shuffle=True)
    bad_key = "ff" + KEY[2:]
    fields, payload = split_blob(encode_chunk(bad_key, FP, TOK, _kv(), codec="lz4", byte_shuffle=True))
    archive = tmp_path / "a.tar"
    _tar_of([_member(bad_key, pack_blob({**fields, "shuffle": 0}, payload)), _member(KEY, good)], archive)
    report = import_archive(archive, tmp_path / "dst")
    assert report.imported == 1 and list(report.rejected) == [f"ff/{bad_key}.kv"]
    assert (tmp_path / "dst" / KEY[:2] / f"{KEY}.kv").read_bytes() == good


def test_import_rejects_links_and_devices(tmp_path):
    """Issue #13: a symlink, hard link, device or fifo member is rejected by name and never created."""
    good = encode_chunk(KEY, FP, TOK, _kv(), codec="lz4", byte_shuffle=True)
    odd = {"aa" + KEY[2:]: dict(type=tarfile.SYMTYPE, linkname="/etc/passwd"),
           "bb" + KEY[2:]: dict(type=tarfile.LNKTYPE, linkname=f"{KEY[:2]}/{KEY}.kv"),
           "cc" + KEY[2:]: dict(type=tarfile.CHRTYPE, devmajor=1, devminor=3),
           "dd" + KEY[2:]: dict(type=tarfile.BLKTYPE, devmajor=7, devminor=0),
           "ee" + KEY[2:]: dict(type=tarfile.FIFOTYPE)}
    archive = tmp_path / "a.tar"
    _tar_of([_member(KEY, good)] + [_member(k, None, **a) for k, a in odd.items()], archive)
    dst = tmp_path / "dst"
    report = import_archive(archive, dst)
    assert report.imported == 1
    assert set(report.rejected) == {f"{k[:2]}/{k}.kv" for k in odd}
    assert all("regular file" in reason for reason in report.rejected.values())
    assert not any((dst / k[:2] / f"{k}.kv").exists() or (dst / k[:2] / f"{k}.kv").is_symlink() for k in odd)


def test_import_bounds_member_reads(tmp_path):
    """A member larger than its header's bound is rejected without reading it whole."""
    blob = encode_chunk(KEY, FP, TOK, _kv(), codec="lz4", byte_shuffle=True)
    archive = tmp_path / "a.tar"
    _tar_of([_member(KEY, blob + b"\x5a" * (16 * MIB))], archive)
    report = None

    def run():
        nonlocal report
        report = import_archive(archive, tmp_path / "dst")

    raised, peak = _peak(run)
    assert raised is None and report.imported == 0
    assert "exceeds" in report.rejected[f"{KEY[:2]}/{KEY}.kv"]
    assert peak < 4 * MIB


def test_store_refuses_an_oversize_file_without_reading_it(tmp_path, layout):
    """A file larger than any chunk of the layout is a quarantined miss, read no further than its size."""
    from lmcache_sgl.config import CacheConfig
    from lmcache_sgl.keys import prefix_keys
    from lmcache_sgl.storage.chunk_file import max_blob_bytes
    from lmcache_sgl.storage.disk_tier import chunk_path
    from lmcache_sgl.tiered_store import TieredStore

    cfg = CacheConfig(chunk_size=layout.chunk_size, local_cpu=False, local_disk=str(tmp_path))
    tokens = list(range(7, 7 + layout.chunk_size))
    (key,) = prefix_keys(layout.fingerprint, tokens, layout.chunk_size)
    path = chunk_path(tmp_path, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # sparse: huge on paper, nothing to read
        f.truncate(max_blob_bytes(layout.chunk_bytes) + 1)
    with TieredStore(cfg, layout) as store:
        assert store.lookup([key]).num_hits == 1  # the scan lists it; only a read can judge it
        assert store.get([key], [tokens]) == []  # a get stops at the first miss
        assert store.stats().corrupt_chunks == 1
    assert not path.exists() and list((tmp_path / "quarantine").iterdir())
