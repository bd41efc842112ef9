"""TieredStore.prefetch: chunks below the host tier reach pinned host slots on background threads."""

import threading

import pytest
import torch

from conftest import prompt_chunks, store_config
from lmcache_sgl import Tier, TieredStore
from lmcache_sgl.config import ConfigError, CacheConfig


def _on_disk(layout, tmp_path, num_chunks, host_chunks=8, seed=0):
    """Chunks written to disk by one store; a new store on the same directory starts with none in host memory."""
    keys, toks, kvs = prompt_chunks(layout, num_chunks, seed=seed)
    cfg = store_config(layout, host_chunks=0, disk_dir=tmp_path, disk_chunks=100)
    with TieredStore(cfg, layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
    return keys, toks, kvs, store_config(layout, host_chunks=host_chunks, disk_dir=tmp_path, disk_chunks=100)


class GatedReader:
    """Wraps a tier's ``read``: each read blocks until the test lets one through."""

    def __init__(self, read):
        self._read = read
        self.allowed = threading.Semaphore(0)
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        assert self.allowed.acquire(timeout=30), "the test never let this read through"
        return self._read(*args, **kwargs)


def _pins(store):
    return {k: store._host.entry(k).refs for k in store._host.keys()}


def test_progress_grows_as_slow_reads_complete(layout, tmp_path):
    """``ready`` counts leading chunks in host memory, and grows one read at a time; the data is exact."""
    keys, toks, kvs, cfg = _on_disk(layout, tmp_path, 3)
    with TieredStore(cfg, layout) as store:
        gate = GatedReader(store._disk.read)
        store._disk.read = gate
        handle = store.prefetch(keys, toks)
        assert handle.progress() == (0, 3, False)  # returned before any read finished
        for n in (1, 2, 3):
            gate.allowed.release()
            while handle.progress().ready < n:
                handle.wait(0.01)
        assert handle.wait(10).done
        got = handle.chunks(3)
        assert [f.tier for f in got] == [Tier.DISK] * 3
        assert all(torch.equal(f.kv, kv) for f, kv in zip(got, kvs))
        assert all(f.entry is not None and f.entry.refs == 1 for f in got)  # pinned in host slots
        handle.release()
        assert set(_pins(store).values()) == {0}


def test_host_chunks_are_ready_at_once_without_a_thread(layout, tmp_path):
    """Leading host-tier chunks are pinned by the call itself: ready before any disk read."""
    keys, toks, kvs, cfg = _on_disk(layout, tmp_path, 3)
    with TieredStore(cfg, layout) as store:
        assert len(store.get(keys[:1], toks[:1])) == 1  # promotes chunk 0 into the host tier
        gate = GatedReader(store._disk.read)
        store._disk.read = gate
        handle = store.prefetch(keys, toks)
        assert handle.progress().ready == 1 and handle.chunks(1)[0].tier == Tier.HOST
        handle.cancel()


def test_cancel_releases_every_pin(layout, tmp_path):
    """Cancelling mid-read stops the prefetch, and every pin it held (host hits, read chunks) is dropped."""
    keys, toks, kvs, cfg = _on_disk(layout, tmp_path, 4)
    with TieredStore(cfg, layout) as store:
        store.get(keys[:1], toks[:1])  # chunk 0 in host memory
        gate = GatedReader(store._disk.read)
        store._disk.read = gate
        handle = store.prefetch(keys, toks)
        gate.allowed.release()  # chunk 1 arrives; chunk 2 blocks in its read
        while handle.progress().ready < 2:
            handle.wait(0.01)
        assert _pins(store) == {keys[0]: 1, keys[1]: 1}
        handle.cancel()
        gate.allowed.release()  # let the blocked read finish: its chunk must not stay pinned
        assert handle.wait(10).done
        assert set(_pins(store).values()) == {0}
        assert gate.calls == 2  # chunk 3 was never read
        with pytest.raises(ValueError, match="released"):
            handle.chunks(1)


@pytest.mark.parametrize("bad", [1, 2])
def test_corrupt_chunk_ends_the_hit_at_that_chunk(layout, tmp_path, bad):
    """A corrupt file is quarantined and the prefetch stops there: ready = its index, the rest unread."""
    keys, toks, kvs, cfg = _on_disk(layout, tmp_path, 4)
    victim = tmp_path / keys[bad][:2] / f"{keys[bad]}.kv"
    blob = victim.read_bytes()
    victim.write_bytes(blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:])
    with TieredStore(cfg, layout) as store:
        handle = store.prefetch(keys, toks)
        progress = handle.wait(10)
        assert progress == (bad, 4, True)
        assert all(torch.equal(f.kv, kv) for f, kv in zip(handle.chunks(bad), kvs))
        assert store.stats().corrupt_chunks == 1 and not victim.exists()
        handle.release()
        assert set(_pins(store).values()) == {0}


def test_token_mismatch_ends_the_hit(layout, tmp_path):
    """A chunk whose stored token ids differ from the request's is a miss, never served."""
    keys, toks, kvs, cfg = _on_disk(layout, tmp_path, 3)
    wrong = [toks[0], [t + 1 for t in toks[1]], toks[2]]
    with TieredStore(cfg, layout) as store:
        assert store.prefetch(keys, wrong).wait(10)[:2] == (1, 3)


def test_without_host_slots_chunks_are_private_copies(layout, tmp_path):
    """With every host slot pinned elsewhere, arrived chunks are held as private copies, still exact."""
    keys, toks, kvs, cfg = _on_disk(layout, tmp_path, 3, host_chunks=1)
    others, other_toks, other_kvs = prompt_chunks(layout, 1, seed=7)
    with TieredStore(cfg, layout) as store:
        store.put(others[0], other_toks[0], other_kvs[0])
        store.pin(others)  # the only host slot is taken
        handle = store.prefetch(keys, toks)
        assert handle.wait(10) == (3, 3, True)
        got = handle.chunks(3)
        assert all(f.entry is None and torch.equal(f.kv, kv) for f, kv in zip(got, kvs))
        handle.release()


def test_close_cancels_running_prefetches(layout, tmp_path):
    """Closing the store stops a prefetch blocked in a read and drops its pins."""
    keys, toks, kvs, cfg = _on_disk(layout, tmp_path, 3)
    store = TieredStore(cfg, layout)
    gate = GatedReader(store._disk.read)
    store._disk.read = gate
    handle = store.prefetch(keys, toks)
    closer = threading.Thread(target=store.close)
    closer.start()
    gate.allowed.release()
    closer.join(30)
    assert not closer.is_alive() and handle.progress().done
    assert set(_pins(store).values()) <= {0}


def test_mismatched_token_lists_raise(layout):
    keys, toks, _ = prompt_chunks(layout, 2)
    with TieredStore(store_config(layout, host_chunks=2), layout) as store:
        with pytest.raises(ValueError, match="2 keys"):
            store.prefetch(keys, toks[:1])


@pytest.mark.parametrize("key,value", [("prefetch_policy", "eager"), ("prefetch_timeout_ms", -1)])
def test_bad_prefetch_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        CacheConfig.load(overrides={key: value}, environ={})
