"""Layer-wise load-back: copies queued per layer, and a forward reading layer i waits for layer i only.

On CPU the real TieredRadixCache loads whole (no counter on the pool). The
ordering is tested on CPU with a recording stand-in for ``TransferStream``
and its events, plugged into the real tree and registered on SGLang's real
MHA pool, whose ``get_key_buffer``/``get_value_buffer`` call our counter as a
forward does. The CUDA test runs the real side stream when a GPU is present.
"""

from __future__ import annotations

import contextlib
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
from lmcache_sgl.adapters.sglang.device_kv import DeviceKV  # noqa: E402
from lmcache_sgl.adapters.sglang.layer_load import LayerCounter, LayerLoader  # noqa: E402
from sglang_cpu_cache import build_cpu_tiered_cache  # noqa: E402

C = 16
LAYERS, HEADS, DIM, SLOTS = 4, 2, 8, 256
NUM_CHUNKS = 3
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class FakeHandle:
    """A TransferHandle double: records waits and synchronizes; completes only when the test says so."""

    def __init__(self, n: int, log: list) -> None:
        self.n, self.log, self.complete = n, log, False

    def wait(self, stream=None) -> None:
        self.log.append(("wait", self.n))

    def synchronize(self) -> None:
        self.log.append(("sync", self.n))
        self.complete = True

    def query(self) -> bool:
        return self.complete


class FakeStream:
    """A TransferStream double: launch n yields handle n and logs its launch and its record."""

    def __init__(self) -> None:
        self.log: list = []
        self.handles: list[FakeHandle] = []

    @contextlib.contextmanager
    def launch(self, *tensors):
        handle = FakeHandle(len(self.handles), self.log)
        self.handles.append(handle)
        self.log.append(("launch", handle.n))
        try:
            yield handle
        finally:
            self.log.append(("record", handle.n))


class Request(SimpleNamespace):
    def __init__(self, rid: str, tokens: np.ndarray) -> None:
        super().__init__(rid=rid, tokens=tokens, extra_key=None, cache_salt=None, session=None, priority=0,
                         cache_request_handle=CacheRequestHandle(rid=rid, attempt_id=0), last_node=None,
                         prefix_len=0, host_hit_length=0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text(f"chunk_size: {C}\nmax_local_cpu_size: 0.01\nload_policy: always\n"
                      "prefetch_policy: wait_complete\nsave_policy: write_back\n")
    cache = build_cpu_tiered_cache(config, monkeypatch, model_path="/models/tiny-layer-load",
                                   layers=LAYERS, heads=HEADS, dim=DIM, slots=SLOTS)
    yield cache
    cache.link.store.close()


@pytest.fixture
def in_host(cache):
    """Tokens whose NUM_CHUNKS chunks are in the host tier, and their KV [L, 2, T, H, D]."""
    rnd = np.random.default_rng(7)
    tokens = rnd.integers(0, 1000, NUM_CHUNKS * C + 5).astype(np.int64)
    kv = torch.from_numpy(rnd.standard_normal((LAYERS, 2, NUM_CHUNKS * C, HEADS, DIM)).astype(np.float32)) + 2.0
    keys = prefix_keys(cache.link.fingerprint, tokens[:NUM_CHUNKS * C], C)
    for i, key in enumerate(keys):
        assert cache.link.store.put(key, tokens[i * C:(i + 1) * C], kv[:, :, i * C:(i + 1) * C], start_pos=i * C)
    return tokens, kv, keys


def fake_layer_loader(cache) -> FakeStream:
    """Plug a layer loader over a FakeStream into the tree, its counter registered on the real pool."""
    stream = FakeStream()
    counter = LayerCounter(LAYERS)
    cache.token_to_kv_pool_allocator.get_kvcache().register_layer_transfer_counter(counter)
    cache.layer_loader = LayerLoader(cache.link.device_kv, stream, counter)
    return stream


def admit(cache, req) -> int:
    """Queue-time match, the admission gate, then the admission's match and load back; tokens loaded."""
    cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", req.tokens.tolist())), req=req))
    cache._prefetches[req.rid].handle.wait(10)
    assert cache.check_prefetch_progress(req.cache_request_handle)
    result = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", req.tokens.tolist())), req=req))
    req.last_node, req.prefix_len = result.last_device_node, result.device_prefix_len
    if result.host_hit_length <= 0:
        return 0
    loaded, req.last_node = cache.init_load_back(InitLoadBackParams(best_match_node=req.last_node,
                                                                   host_hit_length=result.host_hit_length, req=req))
    return loaded


def device_kv_of(cache, tokens: np.ndarray, num_tokens: int) -> torch.Tensor:
    result = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens.tolist()))))
    assert result.device_prefix_len >= num_tokens
    return cache.link.device_kv.gather(cache.path_device_indices(result.last_device_node)[:num_tokens])


def test_on_cpu_the_whole_load_runs_before_the_forward(cache, in_host):
    """CPU: no layer loader and no counter on the pool; the KV is in place when init_load_back returns."""
    tokens, kv, _ = in_host
    assert cache.layer_loader is None
    assert cache.token_to_kv_pool_allocator.get_kvcache().layer_transfer_counter is None
    assert admit(cache, Request("cpu", tokens)) == NUM_CHUNKS * C
    assert torch.equal(device_kv_of(cache, tokens, NUM_CHUNKS * C), kv)


def test_layers_are_queued_in_order_and_a_forward_waits_for_its_layer_only(cache, in_host):
    """Copies are issued layer 0..L-1, the host never waits; reading layer i waits for event i alone."""
    tokens, kv, _ = in_host
    stream = fake_layer_loader(cache)
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    assert admit(cache, Request("lw", tokens)) == NUM_CHUNKS * C
    assert stream.log == [e for n in range(LAYERS) for e in (("launch", n), ("record", n))]
    assert cache.layer_loader.counter.pending_layers() == tuple(range(LAYERS))
    stream.log.clear()
    pool.get_key_buffer(0)  # the forward of layer 0
    assert stream.log == [("wait", 0)]
    pool.get_value_buffer(1)
    pool.get_kv_buffer(2)  # SGLang's get_kv_buffer goes through both getters: K and V wait on event 2
    assert stream.log == [("wait", 0), ("wait", 1), ("wait", 2), ("wait", 2)]
    stream.handles[3].complete = True  # the last layer's copy finished: its readers no longer wait
    stream.log.clear()
    pool.get_key_buffer(3)
    assert stream.log == [] and cache.layer_loader.counter.pending_layers() == (0, 1, 2)
    assert torch.equal(device_kv_of(cache, tokens, NUM_CHUNKS * C), kv)  # CPU double: copies ran in place


def test_a_layer_that_fails_to_queue_is_a_miss_after_the_queued_copies_end(cache, in_host, monkeypatch):
    """Layer 2's copy raises: layers 0..2 are synchronized before the slots are freed; nothing is armed."""
    tokens, _, _ = in_host
    stream = fake_layer_loader(cache)
    allocator = cache.token_to_kv_pool_allocator
    free_before = allocator.available_size()
    real = cache.link.device_kv.scatter_layer

    def scatter_layer(layer, slots, layer_kv):
        if layer == 2:
            raise RuntimeError("copy engine fault")
        real(layer, slots, layer_kv)

    monkeypatch.setattr(cache.link.device_kv, "scatter_layer", scatter_layer)
    assert admit(cache, Request("bad", tokens)) == 0  # prefilled instead
    assert [e for e in stream.log if e[0] == "sync"] == [("sync", 0), ("sync", 1), ("sync", 2)]
    assert cache.layer_loader.counter.pending_layers() == ()
    assert allocator.available_size() == free_before
    result = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens.tolist()))))
    assert result.device_prefix_len == 0  # no loaded KV entered the tree


def test_a_missing_chunk_ends_the_layer_wise_load_there(cache, in_host):
    """Chunk 1 gone from the store: the hit is chunk 0, loaded layer by layer, exact."""
    tokens, kv, keys = in_host
    store = cache.link.store
    with store._lock:
        store._host.remove(keys[1])
    stream = fake_layer_loader(cache)
    assert admit(cache, Request("short", tokens)) == C
    assert [e for e in stream.log if e[0] == "launch"] == [("launch", n) for n in range(LAYERS)]
    assert torch.equal(device_kv_of(cache, tokens, C), kv[:, :, :C])


class CudaPool:
    """The KV-pool surface DeviceKV and LayerLoader use, over CUDA tensors."""

    def __init__(self, slots: int) -> None:
        self.start_layer, self.layer_num = 0, LAYERS
        self.k = [torch.zeros(slots, HEADS, DIM, device="cuda") for _ in range(LAYERS)]
        self.v = [torch.zeros(slots, HEADS, DIM, device="cuda") for _ in range(LAYERS)]
        self.layer_transfer_counter = None

    def get_kv_buffer(self, layer: int):
        return self.k[layer], self.v[layer]

    def register_layer_transfer_counter(self, counter) -> None:
        self.layer_transfer_counter = counter


@needs_cuda
def test_cuda_layer_wise_load_lands_each_layer_before_its_reader():
    """CUDA: after wait_until(i) on the reading stream, layer i's slots hold the loaded KV."""
    pool = CudaPool(SLOTS)
    loader = LayerLoader.for_pool(pool, DeviceKV(pool))
    assert loader is not None and pool.layer_transfer_counter is loader.counter
    slots = torch.randperm(SLOTS, device="cuda")[:C * NUM_CHUNKS]
    kv = torch.randn(LAYERS, 2, C * NUM_CHUNKS, HEADS, DIM) + 2.0
    loader.load(slots, kv)
    for layer in range(LAYERS):
        pool.layer_transfer_counter.wait_until(layer)
        assert torch.equal(pool.k[layer][slots].cpu(), kv[layer, 0])
        assert torch.equal(pool.v[layer][slots].cpu(), kv[layer, 1])
    torch.cuda.synchronize()
    assert pool.layer_transfer_counter.pending_layers() == () or all(
        h.query() for h in loader.counter._pending if h is not None)
