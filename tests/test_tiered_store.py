"""TieredStore scenarios on random chunks: tiers, write-back, restarts, corruption, budgets."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import prompt_chunks, random_chunk, store_config
from lmcache_sgl import Tier, TieredStore


def _equal(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_host_round_trip_is_bit_exact(layout):
    keys, toks, kvs = prompt_chunks(layout, 4)
    with TieredStore(store_config(layout, host_chunks=8), layout) as store:
        assert all(store.put(k, t, kv) for k, t, kv in zip(keys, toks, kvs))
        assert store.lookup(keys) == (4, (Tier.HOST,) * 4)
        got = store.get(keys, toks)
        assert len(got) == 4 and all(_equal(a, b) for a, b in zip(got, kvs))
        got[0].fill_(1)  # returned tensors are private copies
        assert _equal(store.get(keys[:1])[0], kvs[0])


def test_lookup_and_get_stop_at_the_first_miss(layout):
    keys, toks, kvs = prompt_chunks(layout, 3)
    with TieredStore(store_config(layout, host_chunks=8), layout) as store:
        store.put(keys[0], toks[0], kvs[0])
        store.put(keys[2], toks[2], kvs[2])
        assert store.lookup(keys).num_hits == 1
        assert len(store.get(keys, toks)) == 1
        assert store.stats().miss_chunks == 1


def test_host_overflow_writes_back_to_disk(layout, tmp_path):
    keys, toks, kvs = prompt_chunks(layout, 10)
    cfg = store_config(layout, host_chunks=3, disk_dir=tmp_path, disk_chunks=100, disk_write_policy="write_back")
    with TieredStore(cfg, layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            assert store.put(k, t, kv)
        store.flush_pending()
        res = store.lookup(keys)
        assert res.num_hits == 10
        assert res.tiers[:7] == (Tier.DISK,) * 7 and res.tiers[7:] == (Tier.HOST,) * 3
        st = store.stats()
        assert st.host_bytes <= st.host_capacity_bytes == 3 * layout.chunk_bytes
        assert st.host_evictions == 7 and st.writebacks == 7
        got = store.get(keys, toks)
        assert len(got) == 10 and all(_equal(a, b) for a, b in zip(got, kvs))
        assert store.stats().hit_chunks["disk"] >= 7


def test_partial_chunk_round_trips(layout, tmp_path):
    kv = random_chunk(layout, num_tokens=5, seed=3)
    with TieredStore(store_config(layout, host_chunks=0, disk_dir=tmp_path, disk_chunks=10), layout) as store:
        assert store.put("partial", range(5), kv)
        store.flush_pending()
        assert store.lookup(["partial"]).tiers == (Tier.DISK,)
        assert _equal(store.get(["partial"], [range(5)])[0], kv)


def test_bad_chunk_shape_raises(layout):
    with TieredStore(store_config(layout, host_chunks=2), layout) as store:
        with pytest.raises(ValueError, match="expected"):
            store.put("k", range(16), torch.randn(3, 3).to(torch.bfloat16))
        with pytest.raises(ValueError, match="1..16 tokens"):
            store.put("k", range(17), random_chunk(layout))


_RESTART = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import prompt_chunks, store_config
from lmcache_sgl import ChunkLayout, ModelFingerprint, TieredStore
layout = ChunkLayout(ModelFingerprint("tiny-test", "bfloat16", 2, 2, 16), 16)
keys, toks, kvs = prompt_chunks(layout, 6)
store = TieredStore(store_config(layout, host_chunks=2, disk_dir={root!r}, disk_chunks=100), layout)
res = store.lookup(keys)
got = store.get(keys, toks)
ok = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, kvs))
print(res.num_hits, {{t.value for t in res.tiers}}, len(got), ok)
"""


def test_restart_finds_entries_in_a_new_process(layout, tmp_path):
    keys, toks, kvs = prompt_chunks(layout, 6)
    store = TieredStore(store_config(layout, host_chunks=2, disk_dir=tmp_path, disk_chunks=100), layout)
    for k, t, kv in zip(keys, toks, kvs):
        store.put(k, t, kv)
    store.close()  # flushes the host tier down too
    code = _RESTART.format(tests=os.path.dirname(__file__), root=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["6", "{'disk'}", "6", "True"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "swap"])
def test_corrupt_file_is_a_miss_and_quarantined(layout, tmp_path, damage):
    keys, toks, kvs = prompt_chunks(layout, 3)
    cfg = store_config(layout, host_chunks=0, disk_dir=tmp_path, disk_chunks=100)
    with TieredStore(cfg, layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
    victim = tmp_path / keys[1][:2] / f"{keys[1]}.kv"
    blob = victim.read_bytes()
    if damage == "flip":
        blob = blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:]
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "empty":
        blob = b""
    else:  # a valid file of another chunk under this name
        blob = (tmp_path / keys[2][:2] / f"{keys[2]}.kv").read_bytes()
    victim.write_bytes(blob)
    with TieredStore(cfg, layout) as store:
        got = store.get(keys, toks)
        assert len(got) == 1 and _equal(got[0], kvs[0])  # served up to the bad chunk, nothing wrong
        st = store.stats()
        assert st.corrupt_chunks == 1 and st.disk_quarantined == 1
        assert not victim.exists() and len(list((tmp_path / "quarantine").iterdir())) == 1
        assert store.lookup(keys).num_hits == 1


def test_token_mismatch_on_host_is_a_miss(layout):
    keys, toks, kvs = prompt_chunks(layout, 1)
    with TieredStore(store_config(layout, host_chunks=2), layout) as store:
        store.put(keys[0], toks[0], kvs[0])
        assert store.get(keys, [list(range(16))]) == []


def test_pinned_entries_are_not_evicted(layout):
    keys, toks, kvs = prompt_chunks(layout, 4)
    with TieredStore(store_config(layout, host_chunks=2), layout) as store:
        store.put(keys[0], toks[0], kvs[0])
        store.put(keys[1], toks[1], kvs[1])
        assert store.pin(keys[:2]) == 2
        assert not store.put(keys[2], toks[2], kvs[2])  # no slot, nothing evictable
        store.unpin(keys[:1])
        assert store.put(keys[3], toks[3], kvs[3])
        assert store.contains(keys[0]) is None and store.contains(keys[1]) is Tier.HOST
        assert store.stats().puts_dropped == 1


def test_full_write_queue_drops_new_puts_but_keeps_old_data(layout, tmp_path, monkeypatch):
    keys, toks, kvs = prompt_chunks(layout, 6)
    cfg = store_config(layout, host_chunks=1, disk_dir=tmp_path, disk_chunks=100, max_pending_writes=1)
    gate = threading.Event()
    with TieredStore(cfg, layout) as store:
        real_write = store._disk.write
        monkeypatch.setattr(store._disk, "write", lambda k, b: gate.wait(10) and real_write(k, b))
        results = [store.put(k, t, kv) for k, t, kv in zip(keys, toks, kvs)]
        gate.set()
        store.flush_pending()
        assert results[:2] == [True, True] and not all(results)
        for i, ok in enumerate(results):  # every accepted chunk is still served, bit-exact
            if ok:
                assert _equal(store.get([keys[i]], [toks[i]])[0], kvs[i])
        assert store.stats().puts_dropped == results.count(False)


def test_unwritable_disk_dir_disables_the_tier(layout, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    keys, toks, kvs = prompt_chunks(layout, 1)
    with TieredStore(store_config(layout, host_chunks=2, disk_dir=blocker / "sub", disk_chunks=10), layout) as store:
        assert store.put(keys[0], toks[0], kvs[0])
        assert store.lookup(keys).tiers == (Tier.HOST,)


@pytest.mark.parametrize("host_chunks", [0, 2])
def test_disk_write_errors_keep_the_chunk_until_the_disk_works(layout, tmp_path, monkeypatch, host_chunks):
    """A full disk is counted, not raised; the chunk stays readable from memory and is written later."""
    keys, toks, kvs = prompt_chunks(layout, 2)
    cfg = store_config(layout, host_chunks=host_chunks, disk_dir=tmp_path, disk_chunks=10)
    with TieredStore(cfg, layout) as store:
        def full_disk(*a, **k):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr("lmcache_sgl.storage.disk_tier.os.fsync", full_disk)
        assert store.put(keys[0], toks[0], kvs[0])
        store.flush()
        s = store.stats()
        assert s.disk_write_errors == s.write_failures >= 1 and s.writebacks == 0  # without host: written, retried
        assert not list(tmp_path.rglob("*.kv*"))  # no chunk file, no partial (.kv.tmp.*) file left
        assert store.lookup(keys).tiers == (Tier.HOST,) and _equal(store.get(keys, toks)[0], kvs[0])
        monkeypatch.undo()
        store.flush()
        assert store.stats().writebacks == 1
    with TieredStore(store_config(layout, host_chunks=0, disk_dir=tmp_path, disk_chunks=10), layout) as store:
        assert store.lookup(keys).tiers == (Tier.DISK,) and _equal(store.get(keys, toks)[0], kvs[0])


def test_remove_and_clear(layout, tmp_path):
    keys, toks, kvs = prompt_chunks(layout, 4)
    with TieredStore(store_config(layout, host_chunks=2, disk_dir=tmp_path, disk_chunks=10), layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
        store.remove(keys[0])
        assert store.contains(keys[0]) is None and store.contains(keys[3]) is Tier.HOST
        store.clear()
        assert store.lookup(keys[1:]).num_hits == 0 and not list(tmp_path.rglob("*.kv"))


def test_get_into_caller_buffers(layout, tmp_path):
    keys, toks, kvs = prompt_chunks(layout, 3)
    cfg = store_config(layout, host_chunks=1, disk_dir=tmp_path, disk_chunks=10)
    with TieredStore(cfg, layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
        store.flush_pending()
        out = [torch.full(layout.shape(layout.chunk_size), float("nan"), dtype=layout.dtype) for _ in keys]
        got = store.get(keys, toks, out=out)  # chunks 0, 1 from disk, 2 from host
        assert len(got) == 3
        for buf, view, kv in zip(out, got, kvs):
            assert view.data_ptr() == buf.data_ptr() and _equal(buf, kv)
        with pytest.raises(ValueError, match="cannot hold"):
            store.get(keys[:1], out=[torch.empty(3, dtype=layout.dtype)])


def test_borrow_lends_pinned_slots_without_copying(layout, tmp_path):
    keys, toks, kvs = prompt_chunks(layout, 3)
    cfg = store_config(layout, host_chunks=3, disk_dir=tmp_path, disk_chunks=10)
    with TieredStore(cfg, layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
        with store.borrow(keys, toks) as views:
            assert len(views) == 3 and all(_equal(v, kv) for v, kv in zip(views, kvs))
            before = views[0].data_ptr()
            assert not store.put("other", range(16), kvs[0])  # every slot is lent: nothing evictable
            assert store.get(keys[:1])[0].data_ptr() != before  # get still copies
        assert store.put("other", range(16), kvs[0])  # released on exit
        assert store.stats().hit_chunks["host"] == 4


def test_borrow_promotes_disk_hits_and_stops_at_a_miss(layout, tmp_path):
    keys, toks, kvs = prompt_chunks(layout, 3)
    cfg = store_config(layout, host_chunks=0, disk_dir=tmp_path, disk_chunks=10)
    with TieredStore(cfg, layout) as store:  # no host tier: borrowed chunks are private copies
        store.put(keys[0], toks[0], kvs[0])
        store.flush_pending()
        with store.borrow(keys, toks) as views:
            assert len(views) == 1 and _equal(views[0], kvs[0])
    with TieredStore(store_config(layout, host_chunks=2, disk_dir=tmp_path, disk_chunks=10), layout) as store:
        with store.borrow(keys[:1], toks[:1]) as views:
            assert store.lookup(keys[:1]).tiers == (Tier.HOST,)  # promoted and lent
            assert store.stats().hit_chunks == {"host": 0, "disk": 1, "remote": 0}
