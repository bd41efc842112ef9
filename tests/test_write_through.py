"""disk_write_policy: write_through puts reach disk without a flush; write_back waits for eviction.

Each test's docstring states one invariant. A "blocked" disk is the real DiskTier
whose ``write`` waits on an event, so the writer's queue can be filled on purpose.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import prompt_chunks, store_config
from lmcache_sgl import TieredStore
from lmcache_sgl.config import CacheConfig, ConfigError

WAIT_S = 30.0  # generous bound for two busy cores; a healthy run takes milliseconds


def _on_disk(root, key) -> bool:
    return (root / key[:2] / f"{key}.kv").is_file()


def _wait_for(predicate, timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class _BlockedDisk:
    """Wraps DiskTier.write: each write signals ``entered`` and waits for ``release``."""

    def __init__(self, disk) -> None:
        self._write = disk.write
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, key: str, blob: bytes) -> bool:
        self.entered.set()
        self.release.wait(WAIT_S)
        return self._write(key, blob)


def _block_disk(store, monkeypatch) -> _BlockedDisk:
    blocked = _BlockedDisk(store._disk)
    monkeypatch.setattr(store._disk, "write", blocked.write)
    return blocked


def test_write_through_is_the_default_and_a_bad_policy_names_the_choices():
    """The default writes through; an unknown policy is a ConfigError listing the allowed ones."""
    assert CacheConfig().disk_write_policy == "write_through"
    with pytest.raises(ConfigError, match=r"disk_write_policy='sometimes'.*write_through.*write_back"):
        CacheConfig(disk_write_policy="sometimes")
    with pytest.raises(ConfigError, match="shutdown_flush_timeout_s"):
        CacheConfig(shutdown_flush_timeout_s=0)


def test_put_reaches_disk_without_a_flush_and_stays_in_host(layout, tmp_path):
    """After put and a bounded wait the chunk's file exists (no flush call); the host copy stays, clean."""
    keys, toks, kvs = prompt_chunks(layout, 3)
    with TieredStore(store_config(layout, host_chunks=4, disk_dir=tmp_path, disk_chunks=100), layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            assert store.put(k, t, kv)
        assert _wait_for(lambda: all(_on_disk(tmp_path, k) for k in keys))
        assert _wait_for(lambda: store.stats().writebacks == 3)
        st = store.stats()
        assert (st.host_entries, st.pending_writes, st.write_through_dropped) == (3, 0, 0)
        assert store.flush().written == 0  # nothing was left dirty
    with TieredStore(store_config(layout, host_chunks=0, disk_dir=tmp_path, disk_chunks=100), layout) as fresh:
        got = fresh.get(keys, toks)
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, kvs))


def test_clean_entries_are_evicted_without_a_second_write(layout, tmp_path):
    """A written-through entry is clean: evicting it writes nothing again."""
    keys, toks, kvs = prompt_chunks(layout, 5)
    with TieredStore(store_config(layout, host_chunks=2, disk_dir=tmp_path, disk_chunks=100), layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            assert store.put(k, t, kv)
            assert _wait_for(lambda: _on_disk(tmp_path, k))
        store.flush_pending()
        st = store.stats()
        assert st.host_evictions == 3 and st.writebacks == 5


def test_write_back_keeps_chunks_in_host_until_eviction(layout, tmp_path):
    """With write_back nothing is written before eviction; the evicted chunk is then written."""
    keys, toks, kvs = prompt_chunks(layout, 3)
    cfg = store_config(layout, host_chunks=2, disk_dir=tmp_path, disk_chunks=100, disk_write_policy="write_back")
    with TieredStore(cfg, layout) as store:
        for k, t, kv in zip(keys[:2], toks[:2], kvs[:2]):
            assert store.put(k, t, kv)
        store.flush_pending()
        assert not any(_on_disk(tmp_path, k) for k in keys) and store.stats().writebacks == 0
        assert store.put(keys[2], toks[2], kvs[2])  # evicts chunk 0
        store.flush_pending()
        assert _on_disk(tmp_path, keys[0]) and not _on_disk(tmp_path, keys[1])


def test_a_dropped_write_through_stays_dirty_and_its_eviction_writes_it(layout, tmp_path, monkeypatch):
    """A write-through refused by the full queue is counted; the entry stays dirty and reaches disk on eviction."""
    keys, toks, kvs = prompt_chunks(layout, 6)
    cfg = store_config(layout, host_chunks=3, disk_dir=tmp_path, disk_chunks=100, max_pending_writes=1)
    with TieredStore(cfg, layout) as store:
        blocked = _block_disk(store, monkeypatch)
        assert store.put(keys[0], toks[0], kvs[0])
        assert blocked.entered.wait(WAIT_S)  # the writer holds chunk 0; the queue is empty
        assert store.put(keys[1], toks[1], kvs[1])  # queued: the queue is now full
        assert store.put(keys[2], toks[2], kvs[2])  # its write-through is dropped
        assert store.stats().write_through_dropped == 1
        blocked.release.set()
        store.flush_pending()
        assert _on_disk(tmp_path, keys[1]) and not _on_disk(tmp_path, keys[2])
        for k, t, kv in zip(keys[3:], toks[3:], kvs[3:]):  # evicts 0 and 1 (clean), then 2 (dirty)
            assert store.put(k, t, kv)
            store.flush_pending()  # a one-slot queue: let each put's write-through finish
        assert _on_disk(tmp_path, keys[2])
    with TieredStore(store_config(layout, host_chunks=0, disk_dir=tmp_path, disk_chunks=100), layout) as fresh:
        assert torch.equal(fresh.get(keys[2:3], toks[2:3])[0], kvs[2])


def test_evicting_a_chunk_whose_write_through_is_queued_serves_it_until_written(layout, tmp_path, monkeypatch):
    """Eviction during a queued write-through neither loses the chunk nor queues it twice."""
    keys, toks, kvs = prompt_chunks(layout, 3)
    cfg = store_config(layout, host_chunks=1, disk_dir=tmp_path, disk_chunks=100)
    with TieredStore(cfg, layout) as store:
        blocked = _block_disk(store, monkeypatch)
        assert store.put(keys[0], toks[0], kvs[0])
        assert blocked.entered.wait(WAIT_S)
        assert store.put(keys[1], toks[1], kvs[1])  # evicts chunk 0 while it is being written
        assert torch.equal(store.get(keys[:1], toks[:1])[0], kvs[0])  # served from the queued copy
        blocked.release.set()
        store.flush_pending()
        assert _on_disk(tmp_path, keys[0]) and _on_disk(tmp_path, keys[1])
        assert store.stats().writebacks == 2


def test_flush_with_a_time_limit_returns_and_keeps_what_it_could_not_write(layout, tmp_path, monkeypatch):
    """flush(timeout_s) returns about on time while the disk hangs; the unwritten chunks stay servable."""
    keys, toks, kvs = prompt_chunks(layout, 3)
    cfg = store_config(layout, host_chunks=4, disk_dir=tmp_path, disk_chunks=100, disk_write_policy="write_back")
    with TieredStore(cfg, layout) as store:
        blocked = _block_disk(store, monkeypatch)
        for k, t, kv in zip(keys, toks, kvs):
            assert store.put(k, t, kv)
        start = time.monotonic()
        report = store.flush(timeout_s=0.2)  # its first write blocks until released below
        elapsed = time.monotonic() - start
        assert report.timed_out and report.unwritten >= 1
        assert elapsed < WAIT_S / 2  # did not wait for the blocked write
        got = store.get(keys, toks)
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, kvs))
        blocked.release.set()
