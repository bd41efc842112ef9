"""Prefetch under SGLang: disk hits reach host memory on the store's threads while the request waits.

In-process: the real TieredRadixCache on a CPU MHA pool, driven as the
scheduler drives it (``match_prefix`` at queue time, ``check_prefetch_progress``
then ``match_prefix`` and ``init_load_back`` at admission), with a gated disk
reader standing in for slow files.
"""

from __future__ import annotations

import threading
from array import array
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import require

require("sglang")

from sglang.srt.mem_cache.base_prefix_cache import (  # noqa: E402
    CacheRequestHandle,
    InitLoadBackParams,
    MatchPrefixParams,
)
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402

from lmcache_sgl import prefix_keys  # noqa: E402
from lmcache_sgl.metrics import Tier  # noqa: E402
from sglang_cpu_cache import build_cpu_tiered_cache  # noqa: E402

C = 16
LAYERS, HEADS, DIM, SLOTS = 2, 2, 8, 256
NUM_CHUNKS = 3


def build_cache(tmp_path, monkeypatch, policy: str, timeout_ms: int = 1000, host_chunks: int = 16):
    """The real TieredRadixCache on a CPU MHA pool, built by our factory as a scheduler builds it."""
    chunk_bytes = LAYERS * 2 * C * HEADS * DIM * 4
    config = tmp_path / "config.yaml"
    config.write_text(f"chunk_size: {C}\nmax_local_cpu_size: {host_chunks * chunk_bytes / 2**30}\n"
                      f"local_disk: {tmp_path / 'disk'}\nload_policy: always\nprefetch_policy: {policy}\n"
                      f"prefetch_timeout_ms: {timeout_ms}\n")
    return build_cpu_tiered_cache(config, monkeypatch, model_path="/models/tiny-prefetch",
                                  layers=LAYERS, heads=HEADS, dim=DIM, slots=SLOTS)


class GatedReader:
    """A disk tier's ``read`` that blocks until the test lets a read through; records the reading threads."""

    def __init__(self, read):
        self._read = read
        self.allowed = threading.Semaphore(0)
        self.threads: list[str] = []

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        assert self.allowed.acquire(timeout=30), "the test never let this read through"
        return self._read(*args, **kwargs)


class Request(SimpleNamespace):
    """The request fields the tree reads."""

    def __init__(self, rid: str, tokens: np.ndarray) -> None:
        super().__init__(rid=rid, tokens=tokens, extra_key=None, cache_salt=None, session=None, priority=0,
                         cache_request_handle=CacheRequestHandle(rid=rid, attempt_id=0), last_node=None,
                         prefix_len=0, host_hit_length=0)


@pytest.fixture
def on_disk(tmp_path):
    """Tokens whose NUM_CHUNKS chunks are on disk only, and their KV [L, 2, T, H, D]."""
    rnd = np.random.default_rng(3)
    tokens = rnd.integers(0, 1000, NUM_CHUNKS * C + 5).astype(np.int64)
    kv = torch.from_numpy(rnd.standard_normal((LAYERS, 2, NUM_CHUNKS * C, HEADS, DIM)).astype(np.float32)) + 2.0
    return tokens, kv


def put_on_disk(cache, tokens, kv) -> GatedReader:
    """Write the chunks down and empty the host tier; later disk reads go through a gate."""
    store = cache.link.store
    keys = prefix_keys(cache.link.fingerprint, tokens[:NUM_CHUNKS * C], C)
    for i, key in enumerate(keys):
        assert store.put(key, tokens[i * C:(i + 1) * C], kv[:, :, i * C:(i + 1) * C], start_pos=i * C)
    store.flush()
    with store._lock:
        for key in keys:
            store._host.remove(key)
    assert [store.contains(k) for k in keys] == [Tier.DISK] * NUM_CHUNKS
    gate = GatedReader(store._disk.read)
    store._disk.read = gate
    return gate


def match(cache, req) -> int:
    """``match_prefix`` as ``init_next_round_input`` calls it; returns the host hit it reports."""
    result = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", req.tokens.tolist())), req=req))
    req.last_node, req.prefix_len, req.host_hit_length = result.last_device_node, result.device_prefix_len, \
        result.host_hit_length
    return result.host_hit_length


def admit(cache, req) -> int:
    """The admission steps after the gate opened: match, then load back. Returns the tokens loaded."""
    if match(cache, req) <= 0:
        return 0
    loaded, req.last_node = cache.init_load_back(InitLoadBackParams(best_match_node=req.last_node,
                                                                   host_hit_length=req.host_hit_length, req=req))
    return loaded


def wait_ready(cache, rid: str, chunks: int) -> None:
    handle = cache._prefetches[rid].handle
    while handle.progress().ready < chunks:
        handle.wait(0.01)


def device_kv_of(cache, num_tokens: int, tokens) -> torch.Tensor:
    result = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens.tolist())), req=None))
    slots = cache.path_device_indices(result.last_device_node)[:num_tokens]
    return cache.link.device_kv.gather(slots)


def pins(cache) -> list[int]:
    host = cache.link.store._host
    return [host.entry(k).refs for k in host.keys()]


@pytest.fixture
def closing():
    caches = []
    yield caches.append
    for cache in caches:
        cache.link.store.close()


def test_wait_complete_admits_only_once_every_chunk_is_in_host_memory(tmp_path, monkeypatch, on_disk, closing):
    """wait_complete: the gate stays shut while any read is pending; then the whole hit loads, exact."""
    tokens, kv = on_disk
    cache = build_cache(tmp_path, monkeypatch, "wait_complete")
    closing(cache)
    gate = put_on_disk(cache, tokens, kv)
    req = Request("r1", tokens)
    assert match(cache, req) == 0  # queue time: the prefetch starts, nothing in host memory yet
    for arrived in range(NUM_CHUNKS):
        assert not cache.check_prefetch_progress(req.cache_request_handle)
        gate.allowed.release()
        wait_ready(cache, "r1", arrived + 1)
    cache._prefetches["r1"].handle.wait(10)
    assert cache.check_prefetch_progress(req.cache_request_handle)
    assert admit(cache, req) == NUM_CHUNKS * C
    assert torch.equal(device_kv_of(cache, NUM_CHUNKS * C, tokens), kv)
    assert req.storage_hit_length == NUM_CHUNKS * C  # reported as disk ("storage") tokens
    assert "r1" not in cache._prefetches and set(pins(cache)) == {0}  # the load dropped the pins
    assert gate.threads and all(name.startswith("lmcache-sgl-prefetch") for name in gate.threads)


@pytest.mark.parametrize("timeout_ms,expect_open", [(60_000, False), (0, True)])
def test_timeout_admits_with_a_partial_hit_when_files_are_slow(tmp_path, monkeypatch, on_disk, closing,
                                                               timeout_ms, expect_open):
    """timeout: before the limit the gate waits; past it the request goes with the one chunk that arrived."""
    tokens, kv = on_disk
    cache = build_cache(tmp_path, monkeypatch, "timeout", timeout_ms=timeout_ms)
    closing(cache)
    gate = put_on_disk(cache, tokens, kv)
    req = Request("r2", tokens)
    match(cache, req)
    gate.allowed.release()
    wait_ready(cache, "r2", 1)  # chunk 1 of 3 arrived; chunk 2's read blocks
    assert cache.check_prefetch_progress(req.cache_request_handle) is expect_open
    if not expect_open:
        return
    handle = cache._prefetches["r2"].handle
    assert admit(cache, req) == C  # a shorter hit: the rest is prefilled
    assert torch.equal(device_kv_of(cache, C, tokens), kv[:, :, :C])
    gate.allowed.release(NUM_CHUNKS)  # unblock the cancelled read
    assert handle.wait(10).done and set(pins(cache)) == {0}  # the late chunk was not left pinned


@pytest.mark.parametrize("busy", [True, False])
def test_best_effort_waits_only_while_nothing_else_runs(tmp_path, monkeypatch, on_disk, closing, busy):
    """best_effort: with requests running, admit at once with what arrived; on an idle engine, wait."""
    tokens, kv = on_disk
    cache = build_cache(tmp_path, monkeypatch, "best_effort")
    closing(cache)
    cache.bind_engine_busy(lambda: busy)
    gate = put_on_disk(cache, tokens, kv)
    req = Request("r3", tokens)
    match(cache, req)
    assert cache.check_prefetch_progress(req.cache_request_handle) is busy
    if busy:
        assert admit(cache, req) == 0  # nothing arrived: admitted as a miss, the prefetch is dropped
        assert "r3" not in cache._prefetches
    gate.allowed.release(NUM_CHUNKS)
    if not busy:
        cache._prefetches["r3"].handle.wait(10)
        assert cache.check_prefetch_progress(req.cache_request_handle)
        assert admit(cache, req) == NUM_CHUNKS * C


class PeerAgreement:
    """A stand-in TP peer: MIN against the peer's values, given in call order."""

    def __init__(self, *peer_values: int) -> None:
        self.peer_values = list(peer_values)
        self.proposed: list[int] = []

    def min(self, value: int) -> int:
        self.proposed.append(value)
        return min(value, self.peer_values.pop(0))


def test_ranks_agree_on_the_prefetched_length(tmp_path, monkeypatch, on_disk, closing):
    """Under TP the reported hit is the MIN over ranks of the chunks each holds in host memory."""
    tokens, kv = on_disk
    cache = build_cache(tmp_path, monkeypatch, "wait_complete")
    closing(cache)
    gate = put_on_disk(cache, tokens, kv)
    gate.allowed.release(NUM_CHUNKS)
    req = Request("r4", tokens)
    match(cache, req)
    cache._prefetches["r4"].handle.wait(10)
    # The peer: every chunk on disk (hit_end), done reading, but 1 chunk in host memory at this match.
    cache.link.agree = PeerAgreement(1, NUM_CHUNKS * C, 1)
    assert cache.check_prefetch_progress(req.cache_request_handle)
    assert match(cache, req) == C
    assert cache.link.agree.proposed == [1, NUM_CHUNKS * C, NUM_CHUNKS]  # done, hit end, arrived chunks
    cache.link.agree = PeerAgreement(NUM_CHUNKS * C, 0)
    assert match(cache, req) == 0  # a peer with nothing arrived: no host hit on any rank


def test_a_corrupt_chunk_ends_the_hit_and_the_output_is_exact(tmp_path, monkeypatch, on_disk, closing):
    """A corrupt second chunk: the prefetch is done at 1 chunk; the load is that chunk, exact."""
    tokens, kv = on_disk
    cache = build_cache(tmp_path, monkeypatch, "wait_complete")
    closing(cache)
    gate = put_on_disk(cache, tokens, kv)
    store = cache.link.store
    keys = prefix_keys(cache.link.fingerprint, tokens[:NUM_CHUNKS * C], C)
    real_read = gate._read

    def corrupt_second(key, *args, **kwargs):
        blob = real_read(key, *args, **kwargs)
        return blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:] if key == keys[1] else blob

    gate._read = corrupt_second
    gate.allowed.release(NUM_CHUNKS)
    req = Request("r5", tokens)
    match(cache, req)
    assert cache._prefetches["r5"].handle.wait(10)[:3] == (1, NUM_CHUNKS, True)
    assert cache.check_prefetch_progress(req.cache_request_handle)
    assert admit(cache, req) == C
    assert torch.equal(device_kv_of(cache, C, tokens), kv[:, :, :C])
    assert store.stats().corrupt_chunks == 1


def test_release_and_reset_drop_the_pins(tmp_path, monkeypatch, on_disk, closing):
    """A queued request that is aborted, or a /flush_cache, leaves no host slot pinned."""
    tokens, kv = on_disk
    cache = build_cache(tmp_path, monkeypatch, "wait_complete")
    closing(cache)
    gate = put_on_disk(cache, tokens, kv)
    gate.allowed.release(NUM_CHUNKS)
    for rid in ("a", "b"):
        match(cache, Request(rid, tokens))
        cache._prefetches[rid].handle.wait(10)
    assert max(pins(cache)) == 2
    cache.release_aborted_request(CacheRequestHandle(rid="a", attempt_id=0))
    assert max(pins(cache)) == 1
    cache.reset()
    assert set(pins(cache)) == {0} and not cache._prefetches


# ---- a real CPU server ------------------------------------------------------

SERVER_CHUNK = 64  # a multiple of --page-size 16
SERVER_PREFIX = 512  # 8 chunks
READ_DELAY_S = 0.5  # per chunk file read, injected into the server: 4 s for the prefix
SLOW_READS = f"""
import time

import lmcache_sgl.storage.disk_tier as _disk_tier

_read = _disk_tier.DiskTier.read


def _slow_read(self, *args, **kwargs):
    time.sleep({READ_DELAY_S})
    return _read(self, *args, **kwargs)


_disk_tier.DiskTier.read = _slow_read
"""


def _prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


def _stream(server, ids: list[int], max_new_tokens: int, arrivals: list[float], out: dict) -> None:
    """Greedy streaming /generate; appends each new token's arrival time (monotonic) to ``arrivals``."""
    import json
    import time

    import requests

    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    seen = 0
    with requests.post(server.url("/generate"), json=body, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data:"):])
            now = time.monotonic()
            done = event["meta_info"]["completion_tokens"]
            arrivals.extend([now] * (done - seen))
            seen = done
            out.update(event)


@pytest.fixture(scope="module")
def server_run(tmp_path_factory):
    """One server with a disk-only store (every store hit is a disk read, slowed), driven once."""
    import time

    from lmcache_sgl.adapters.sglang.local_server import LocalServer
    from lmcache_sgl.models import build_tiny_llama

    work = tmp_path_factory.mktemp("prefetch-e2e")
    model = build_tiny_llama(work / "model")
    (work / "inject").mkdir()
    (work / "inject" / "sitecustomize.py").write_text(SLOW_READS)
    cfg = work / "lmcache.yaml"
    cfg.write_text(f"chunk_size: {SERVER_CHUNK}\nlocal_cpu: false\nlocal_disk: {work / 'disk'}\n"
                   "load_policy: always\nprefetch_policy: wait_complete\n")
    server = LocalServer(model, work / "server.log", ["--enable-lmcache", "--lmcache-config-file", str(cfg)],
                         env={"PYTHONPATH": str(work / "inject")})
    returning = _prompt(1, SERVER_PREFIX) + [7, 8, 9]
    out: dict = {}
    try:
        reference: dict = {}
        _stream(server, returning, 8, [], reference)  # a miss: SGLang's own prefill
        for seed in (100, 101, 102):  # 3 x 400 tokens through a 1024-token pool: the prefix is evicted, saved
            _stream(server, _prompt(seed, 400), 1, [], {})
        server.flush()  # drops the device tree; the store's pending writes reach disk
        decoding, decoding_out = [], {}
        streamer = threading.Thread(target=_stream, args=(server, _prompt(5, 64), 400, decoding, decoding_out))
        streamer.start()
        while len(decoding) < 3:  # the other user is decoding
            time.sleep(0.05)
        sent, first, returned = time.monotonic(), [], {}
        _stream(server, returning, 8, first, returned)
        streamer.join(300)
        out.update(reference=reference, returned=returned, decoding=decoding, sent=sent, first=first[0],
                   decoding_total=decoding_out["meta_info"]["completion_tokens"])
    finally:
        server.stop()
    return out


def _details(event: dict) -> dict:
    return event["meta_info"].get("cached_tokens_details") or {}


@pytest.mark.sglang
@pytest.mark.slow
def test_server_disk_hit_is_prefetched_and_output_equals_a_prefill(server_run):
    """The returning prompt's prefix comes whole from disk, and its greedy tokens equal SGLang's own prefill."""
    returned = server_run["returned"]
    assert _details(returned).get("storage") == SERVER_PREFIX
    assert returned["output_ids"] == server_run["reference"]["output_ids"]


@pytest.mark.sglang
@pytest.mark.slow
def test_server_keeps_decoding_while_a_disk_hit_is_read(server_run):
    """While the returning prompt's 8 chunk files are read, the other stream keeps receiving tokens.

    With the reads on the scheduler thread (before this change) every step
    stalled until the load finished: 3 tokens of the other stream arrived
    between the send and the returning prompt's first token, all before its
    admission; with the prefetch, 267 did (2 cores). The bound asks for two
    tokens per chunk read, a count, not a duration.
    """
    during = [t for t in server_run["decoding"] if server_run["sent"] < t < server_run["first"]]
    assert server_run["decoding_total"] == 400
    assert len(during) >= 2 * SERVER_PREFIX // SERVER_CHUNK
