"""The counted fault campaign (issue #13): CI runs ``scripts/fault_campaign.py --quick``,
and the defects the campaign found have regression tests here."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import in_ci, prompt_chunks, store_config
from lmcache_sgl import TieredStore
from lmcache_sgl.storage.chunk_file import CorruptChunk
from lmcache_sgl.storage.disk_tier import DiskTier

ROOT = Path(__file__).resolve().parents[1]
CASES = {"kill9", "corrupt", "full_disk", "processes", "fuzz", "redis", "host_budget"}


def test_quick_campaign_serves_no_wrong_kv_and_runs_every_case():
    """Every case ran (or printed why it could not), none failed, and no hit differed from its stored bytes."""
    done = subprocess.run([sys.executable, "scripts/fault_campaign.py", "--quick", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    results = json.loads(done.stdout)
    by_case = {r["case"]: r for r in results}
    assert set(by_case) == CASES
    for r in results:
        assert r["wrong_kv"] == 0, r
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["skipped"], r  # a skip names its reason
        else:
            assert r["tries"] > 0 and not r["failures"], r
    assert done.returncode == 0, done.stderr[-2000:]
    if in_ci():  # run_tests.sh installs redis-server: under CI the Redis case must run
        assert by_case["redis"]["status"] == "ok", by_case["redis"]
    assert by_case["corrupt"]["outcomes"]["quarantined"] == by_case["corrupt"]["tries"]
    assert by_case["fuzz"]["outcomes"]["corrupt (miss)"] > 0


def _get_in_thread(store, keys, toks, timeout_s: float = 10.0):
    """(finished, result) of ``store.get`` run on a thread for at most ``timeout_s``."""
    out = []
    worker = threading.Thread(target=lambda: out.append(store.get(keys, toks)), daemon=True)
    worker.start()
    worker.join(timeout_s)
    return not worker.is_alive(), out[0] if out else None


def test_a_fifo_in_place_of_a_chunk_file_is_a_quarantined_miss_not_a_hang(layout, tmp_path):
    """Opening a FIFO blocks until a writer comes: the disk tier must not wait on anything but a regular file."""
    keys, toks, kvs = prompt_chunks(layout, 1)
    with TieredStore(store_config(layout, 0, tmp_path, 8), layout) as store:
        assert store.put(keys[0], toks[0], kvs[0])
    path = tmp_path / keys[0][:2] / f"{keys[0]}.kv"
    path.unlink()
    os.mkfifo(path)
    store = TieredStore(store_config(layout, 0, tmp_path, 8), layout)
    try:
        finished, got = _get_in_thread(store, keys, toks)
        if not finished:  # unblock the reader so the test process can end
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        assert finished, "get blocked on a FIFO"
        assert got == [] and store.stats().disk_quarantined == 1
        assert not path.exists()
    finally:
        store.close()


def test_a_link_to_a_device_is_refused_before_reading(layout, tmp_path):
    """A chunk name linked to a device (/dev/zero would never end) is refused on its type, not read."""
    keys, toks, kvs = prompt_chunks(layout, 1)
    with TieredStore(store_config(layout, 0, tmp_path, 8), layout) as store:
        assert store.put(keys[0], toks[0], kvs[0])
    path = tmp_path / keys[0][:2] / f"{keys[0]}.kv"
    path.unlink()
    path.symlink_to("/dev/null")  # reads as empty: safe even where the check is missing
    with pytest.raises(CorruptChunk, match="not a regular file"):
        DiskTier(tmp_path, 8 * layout.chunk_bytes, "LRU").read(keys[0])
    with TieredStore(store_config(layout, 0, tmp_path, 8), layout) as store:
        assert store.get(keys, toks) == []
        assert store.stats().disk_quarantined == 1
    assert Path("/dev/null").exists() and not path.is_symlink()


def test_a_read_hit_survives_a_failing_mtime_update(layout, tmp_path, monkeypatch):
    """On a read-only mount ``utime`` fails; the file was read whole, so it is still a hit."""
    keys, toks, kvs = prompt_chunks(layout, 1)
    with TieredStore(store_config(layout, 0, tmp_path, 8), layout) as store:
        assert store.put(keys[0], toks[0], kvs[0])

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "utime", read_only)
    with TieredStore(store_config(layout, 0, tmp_path, 8), layout) as store:
        got = store.get(keys, toks)
        assert len(got) == 1 and torch.equal(got[0], kvs[0])


def test_a_directory_in_place_of_a_chunk_file_is_quarantined(layout, tmp_path):
    """A directory named like a chunk file is a miss and is moved out, not retried on every lookup."""
    keys, toks, kvs = prompt_chunks(layout, 1)
    with TieredStore(store_config(layout, 0, tmp_path, 8), layout) as store:
        assert store.put(keys[0], toks[0], kvs[0])
    path = tmp_path / keys[0][:2] / f"{keys[0]}.kv"
    path.unlink()
    path.mkdir()
    with TieredStore(store_config(layout, 0, tmp_path, 8), layout) as store:
        assert store.get(keys, toks) == []
        assert store.stats().disk_quarantined == 1
        assert not path.exists() and store.lookup(keys).num_hits == 0


def test_abandoned_writes_during_an_outage_are_logged_at_a_bounded_rate(layout, tmp_path, caplog):
    """A lower tier that fails every write must not cost one error line per chunk (the campaign's
    Redis outage logged 36,000 in 10 s, under the store's lock); the counter still counts each one."""
    for i in range(256):
        (tmp_path / f"{i:02x}").write_bytes(b"x")  # a file where each chunk subdirectory belongs: writes fail
    keys, toks, kvs = prompt_chunks(layout, 40)
    caplog.set_level(logging.ERROR, logger="lmcache_sgl.store_writes")
    store = TieredStore(store_config(layout, 0, tmp_path, 100, max_pending_writes=2), layout)
    try:
        for key, tok, kv in zip(keys, toks, kvs):
            while not store.put(key, tok, kv):
                store.flush_pending()
        store.flush()
        abandoned = store.stats().writes_abandoned
    finally:
        store.close()
    lines = [r for r in caplog.records if r.name == "lmcache_sgl.store_writes"]
    assert abandoned >= 20
    assert 1 <= len(lines) <= 2, len(lines)
