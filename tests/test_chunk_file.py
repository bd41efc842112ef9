"""Chunk file format: bit-exact round trips; every corruption is CorruptChunk, never wrong data."""

import pytest
import torch

from lmcache_sgl.keys import token_bytes
from lmcache_sgl.storage import codec
from lmcache_sgl.storage.chunk_file import CorruptChunk, decode_chunk, encode_chunk, read_header

FP = {"model_name": "m", "kv_dtype": "bfloat16"}
TOK = token_bytes(range(100, 116))


def _kv(dtype, shape=(2, 2, 16, 2, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("name", ["lz4", "zstd", "none"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_round_trip_is_bit_exact(dtype, name, shuffle):
    kv = _kv(dtype)
    blob = encode_chunk("k1", FP, TOK, kv, codec=name, byte_shuffle=shuffle, start_pos=32)
    header, out = decode_chunk(blob, key="k1", token_ids=TOK, fingerprint=FP)
    assert out.dtype == dtype and out.shape == kv.shape
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))
    assert header.start_pos == 32 and header.num_tokens == 16 and header.codec == name


def test_multi_block_payload_round_trips():
    kv = _kv(torch.bfloat16, shape=(4, 2, 256, 4, 128))  # 2 MiB: two 1 MiB frames
    blob = encode_chunk("big", FP, TOK, kv, codec="lz4", byte_shuffle=True)
    header, _ = read_header(blob)
    assert len(header.block_sizes) == 2
    _, out = decode_chunk(blob, key="big")
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))


def test_shuffle_is_inverse_and_helps_lz4():
    kv = _kv(torch.bfloat16, shape=(4, 2, 256, 4, 64))
    raw = kv.view(-1).view(torch.uint8).numpy()
    assert (codec.unshuffle(codec.shuffle(raw, 2), 2) == raw).all()
    assert (codec.unshuffle(codec.shuffle(raw, 4), 4) == raw).all()
    plain = len(codec.encode(raw, "lz4", 1).data)
    shuffled = len(codec.encode(raw, "lz4", 2).data)
    assert shuffled < 0.95 * plain  # high bytes (sign, exponent) of normal values repeat


def test_every_truncation_is_detected():
    blob = encode_chunk("k", FP, TOK, _kv(torch.bfloat16), codec="lz4", byte_shuffle=True)
    for cut in range(0, len(blob), max(1, len(blob) // 97)):
        with pytest.raises(CorruptChunk):
            decode_chunk(blob[:cut], key="k")


def test_flipped_bytes_are_detected_everywhere():
    blob = bytearray(encode_chunk("k", FP, TOK, _kv(torch.float16), codec="none", byte_shuffle=False))
    _, payload_at = read_header(blob)
    for pos in [0, 9, payload_at - 3, payload_at, payload_at + 777, len(blob) - 1]:
        bad = bytearray(blob)
        bad[pos] ^= 0x5A
        with pytest.raises(CorruptChunk):
            decode_chunk(bytes(bad), key="k", token_ids=TOK)


def test_wrong_identity_is_rejected():
    blob = encode_chunk("k", FP, TOK, _kv(torch.bfloat16), codec="lz4", byte_shuffle=True)
    with pytest.raises(CorruptChunk, match="key"):
        decode_chunk(blob, key="other")
    with pytest.raises(CorruptChunk, match="token ids"):
        decode_chunk(blob, key="k", token_ids=token_bytes(range(16)))
    with pytest.raises(CorruptChunk, match="fingerprint"):
        decode_chunk(blob, key="k", fingerprint={**FP, "model_name": "x"})


def test_unknown_codec_names_the_allowed():
    with pytest.raises(ValueError, match="allowed"):
        encode_chunk("k", FP, TOK, _kv(torch.bfloat16), codec="brotli", byte_shuffle=True)


@pytest.mark.parametrize("name", ["lz4", "zstd", "none"])
def test_empty_chunk_round_trips(name):
    kv = _kv(torch.bfloat16, shape=(2, 2, 0, 2, 16))
    blob = encode_chunk("k", FP, b"", kv, codec=name, byte_shuffle=True)
    header, out = decode_chunk(blob, key="k")
    assert header.raw_len == 0 and header.block_sizes == (len(blob) - read_header(blob)[1],)
    assert out.shape == kv.shape and out.dtype == torch.bfloat16


@pytest.mark.parametrize("shuffle", [True, False])
def test_decoded_tensor_owns_its_memory(shuffle):
    """The tensor is a writable copy: changing the blob afterwards never changes served KV."""
    kv = _kv(torch.float16)
    blob = bytearray(encode_chunk("k", FP, TOK, kv, codec="none", byte_shuffle=shuffle))
    _, out = decode_chunk(blob, key="k")
    blob[-64:] = bytes(64)
    out.view(-1)[0] = out.view(-1)[0]  # writable
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))


def test_frame_count_must_match_the_blocks_of_raw_len():
    """Two 1 MiB frames for a 2 MiB chunk; dropping or duplicating one is corrupt before decompressing."""
    import msgpack

    kv = _kv(torch.bfloat16, shape=(4, 2, 256, 4, 128))
    blob = encode_chunk("big", FP, TOK, kv, codec="zstd", byte_shuffle=True)
    header, offset = read_header(blob)
    fields = msgpack.unpackb(blob[12:offset], raw=False)
    first = blob[offset:offset + header.block_sizes[0]]
    for sizes, payload in (([header.block_sizes[0]], first), ([header.block_sizes[0]] * 3, first * 3)):
        packed = msgpack.packb({**fields, "block_sizes": sizes}, use_bin_type=True)
        bad = blob[:8] + len(packed).to_bytes(4, "little") + packed + payload
        with pytest.raises(CorruptChunk, match="blocks"):
            decode_chunk(bad, key="big")
