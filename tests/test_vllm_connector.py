"""LMCacheSGLConnector under vLLM's real Scheduler on CPU (see test_vllm_harness.py).

The fake model writes a known KV value per (layer, position, token) into the
slot of every token it computes; anything else in the pool came from our store.
"""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import require

require("vllm")

from test_vllm_harness import HEAD_DIM, Harness, token_kv, write_model_dir  # noqa: E402

from lmcache_sgl import ConfigError, ModelFingerprint, Tier, prefix_keys  # noqa: E402
from lmcache_sgl.adapters.vllm import cache_config_from, lookup_address  # noqa: E402
from lmcache_sgl.adapters.vllm_scheduler import LookupClient, TransferSpec, LMCacheSGLMetadata  # noqa: E402
from lmcache_sgl.adapters.vllm_worker import LookupServer, WorkerSide  # noqa: E402
from lmcache_sgl.model_identity import model_identity  # noqa: E402

CHUNK = 32  # two vLLM blocks of 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama-vllm")


def store_extra(disk=None, **kw) -> dict:
    return {"chunk_size": CHUNK, "max_local_cpu_size": 0.01, "local_disk": str(disk) if disk else None, **kw}


def random_prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def canonical(prompt: list[int], start: int, end: int) -> torch.Tensor:
    """The fake model's KV of tokens [start, end) in the store's layout [L, 2, T, H, D]."""
    kv = token_kv(prompt, start, end)  # [L, T, H, 2D]
    return torch.stack([kv[..., :HEAD_DIM], kv[..., HEAD_DIM:]], dim=1)


def chunk_token_ids(prompt: list[int], num_keys: int) -> list[list[int]]:
    return [prompt[i * CHUNK:(i + 1) * CHUNK] for i in range(num_keys)]


@pytest.mark.parametrize("unfull", [False, True])
@pytest.mark.parametrize("layout", ["head-major", "cpu-attn"])
def test_prompt_saves_its_chunks(model_dir, unfull, layout):
    """A 100-token prompt saves chunks [0,32), [32,64), [64,96), plus [96,100) only with save_unfull_chunk.

    Whatever the backend's K/V placement, the chunks are canonical: [L, 2, T, H, D], K first.
    """
    h = Harness(model_dir, store_extra(save_unfull_chunk=unfull), layout=layout)
    prompt = random_prompt(100)
    h.add(prompt)
    h.run()
    fp = h.store.layout.fingerprint
    assert fp.model_name.startswith("tiny-llama-vllm@") and fp.model_name == model_identity(model_dir)
    assert fp == ModelFingerprint(fp.model_name, "float32", num_layers=2, num_kv_heads=2, head_dim=64)
    keys = prefix_keys(fp, prompt, CHUNK, include_partial=unfull)
    assert len(keys) == (4 if unfull else 3)
    chunks = h.store.get(keys, chunk_token_ids(prompt, len(keys)))
    assert len(chunks) == len(keys)
    for i, chunk in enumerate(chunks):
        assert torch.equal(chunk, canonical(prompt, i * CHUNK, min((i + 1) * CHUNK, 100)))
    assert h.store.stats().put_chunks == len(keys)
    # the 100-token forward was timed: the store can weigh loads against recomputes
    assert h.store.cost.estimate(Tier.DISK, 1 << 20, CHUNK).recompute_s is not None
    h.shutdown()


@pytest.mark.parametrize("layout", ["head-major", "token-major", "cpu-attn"])
@pytest.mark.parametrize("prompt_len,hit", [(100, 96), (96, 95)], ids=["tail", "full-prompt-hit"])
def test_repeat_loads_chunks_byte_for_byte(model_dir, layout, prompt_len, hit):
    """A repeat after a restart of vLLM's cache loads [0, hit) from the store, exactly.

    A full-prompt hit loads one token fewer, so vLLM still computes the last one.
    """
    h = Harness(model_dir, store_extra(), layout=layout)
    prompt = random_prompt(prompt_len, seed=1)
    h.add(prompt)
    h.run()
    h.wipe()
    req = h.add(prompt)
    out = h.step()
    (new,) = out.scheduled_new_reqs
    assert new.num_computed_tokens == hit
    assert [(s.start, s.end) for s in out.kv_connector_metadata.loads] == [(0, hit)]
    assert out.num_scheduled_tokens[req.request_id] == prompt_len - hit
    h.run()
    assert torch.equal(h.slots(req, 0, prompt_len), token_kv(prompt, 0, prompt_len))
    assert h.store.stats().hit_chunks["host"] == 3
    assert h.store.stats().put_chunks == 3  # the repeat stored nothing new
    h.shutdown()


def test_chunked_prefill_saves_each_chunk_once(model_dir):
    """With a 48-token step budget, each chunk is saved in the step that completes it."""
    h = Harness(model_dir, store_extra(), max_batched_tokens=48)
    prompt = random_prompt(100, seed=2)
    h.add(prompt)
    h.run()
    saved = [(s.start, s.end) for out, _ in h.outputs for s in out.kv_connector_metadata.saves]
    assert saved == [(0, 32), (32, 96)]  # steps compute [0,48), [48,96), [96,100)
    keys = prefix_keys(h.store.layout.fingerprint, prompt, CHUNK)
    assert h.store.lookup(keys).num_hits == 3
    h.shutdown()


def test_corrupted_chunk_rolls_back_under_recompute(model_dir, tmp_path):
    """A corrupt chunk 1 on disk: chunk 0 loads, blocks of [32, 96) are reported, vLLM recomputes them.

    The recompute saves chunk 1 again, so the next request loads all three chunks.
    """
    disk = tmp_path / "kv"
    first = Harness(model_dir, store_extra(disk))
    prompt = random_prompt(100, seed=3)
    first.add(prompt)
    first.run()
    keys = prefix_keys(first.store.layout.fingerprint, prompt, CHUNK)
    first.shutdown()  # flushes the host tier to disk
    path = disk / keys[1][:2] / f"{keys[1]}.kv"
    blob = bytearray(path.read_bytes())
    blob[-100:-90] = bytes(10)
    path.write_bytes(bytes(blob))

    h = Harness(model_dir, store_extra(disk))  # a restarted engine: empty pool, empty host tier
    req = h.add(prompt, max_tokens=2)
    h.step()
    out, invalid = h.outputs[-1]
    assert [(s.start, s.end) for s in out.kv_connector_metadata.loads] == [(0, 96)]
    assert invalid == set(h.block_ids[req.request_id][2:6])  # the blocks of tokens [32, 96)
    out = h.step()
    assert out.scheduled_cached_reqs.num_computed_tokens == [32]  # rolled back to the loaded prefix
    assert out.num_scheduled_tokens[req.request_id] == 68
    h.run()
    assert req.num_output_tokens == 2  # the failed step's sample was dropped
    assert torch.equal(h.slots(req, 0, 100), token_kv(prompt, 0, 100))
    stats = h.store.stats()
    assert (stats.corrupt_chunks, stats.disk_quarantined, stats.put_chunks) == (1, 1, 1)  # chunk 1 re-saved
    assert h.store.lookup(keys).num_hits == 3  # chunk 2 was still on disk

    h.wipe()  # the next request loads all three chunks
    again = h.add(prompt)
    out = h.step()
    assert [(s.start, s.end) for s in out.kv_connector_metadata.loads] == [(0, 96)]
    h.run()
    assert torch.equal(h.slots(again, 0, 100), token_kv(prompt, 0, 100))
    assert h.store.stats().put_chunks == 1
    h.shutdown()


def test_store_errors_are_logged_misses(model_dir, caplog, monkeypatch):
    """A store that raises on get and on put costs only cache hits: requests still finish correctly."""
    h = Harness(model_dir, store_extra())
    prompt = random_prompt(100, seed=4)
    h.add(prompt)
    h.run()
    h.wipe()

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(h.store, "get", broken)
    monkeypatch.setattr(h.store, "put", broken)
    with caplog.at_level(logging.ERROR, logger="lmcache_sgl"):
        loaded = h.add(prompt + [5, 6, 7])  # its lookup hits, its load raises
        fresh = h.add(random_prompt(64, seed=5))  # nothing to load, its save raises
        h.run()
    assert torch.equal(h.slots(loaded, 0, 103), token_kv(loaded.all_token_ids, 0, 103))
    assert torch.equal(h.slots(fresh, 0, 64), token_kv(fresh.all_token_ids, 0, 64))
    assert "load of request" in caplog.text and "save of request" in caplog.text
    h.shutdown()


def test_lookup_without_a_worker_is_a_miss(caplog):
    client = LookupClient(["/nonexistent/lmcache-sgl.sock"], b"key")
    with caplog.at_level(logging.WARNING, logger="lmcache_sgl"):
        assert client.lookup([1, 2, 3]) == 0
    assert "treating it as a miss" in caplog.text


def test_tp_ranks_store_shards_under_their_own_keys(tmp_path):
    """Each rank keys by its tp_rank; the scheduler's hit is the shortest over the ranks."""
    config = cache_config_from(store_extra())
    layers = {f"model.layers.{i}.self_attn.attn": torch.randn(8, 1, 16, 2 * HEAD_DIM) for i in range(2)}
    prompt = random_prompt(100, seed=5)
    workers, servers = [], []
    for rank, num_chunks in ((0, 3), (1, 2)):
        w = WorkerSide(config, "tiny", block_size=16, tp_rank=rank, tp_size=2)
        w.register(layers, backends=set())
        end = num_chunks * CHUNK
        w.save(LMCacheSGLMetadata(saves=[TransferSpec("r", prompt[:end], 0, end, list(range(end // 16)))]))
        servers.append(LookupServer(lookup_address("engine-tp", rank), b"secret", w.lookup))
        workers.append(w)
    keys = [prefix_keys(w.fingerprint, prompt, CHUNK) for w in workers]
    assert set(keys[0]).isdisjoint(keys[1])
    client = LookupClient([lookup_address("engine-tp", r) for r in range(2)], b"secret")
    assert client.lookup(prompt) == 2 * CHUNK
    client.close()
    for s, w in zip(servers, workers):
        s.close()
        w.close()


def test_config_sources(tmp_path, monkeypatch):
    """The extra config beats LMCACHE_* variables, which beat the YAML file; unknown keys are refused."""
    yaml = tmp_path / "lmcache.yaml"
    yaml.write_text("chunk_size: 64\nmax_local_cpu_size: 2\nlocal_disk: /from/yaml\n")
    monkeypatch.setenv("LMCACHE_LOCAL_DISK", "/from/env")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "3")
    config = cache_config_from({"config_file": str(yaml), "lmcache.max_local_cpu_size": 4})
    assert (config.chunk_size, config.local_disk, config.max_local_cpu_size) == (64, "/from/env", 4.0)
    with pytest.raises(ConfigError, match="chunk_sise"):
        cache_config_from({"chunk_sise": 64})
