"""get/borrow read and decode disk chunks ahead on the I/O pool: same results, counters and budgets as one by one."""

import threading

import pytest
import torch

from conftest import prompt_chunks, store_config
from lmcache_sgl import Tier, TieredStore
from lmcache_sgl.read_ahead import on_io_thread

IO_THREADS = 4


def _equal(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _on_disk(layout, tmp_path, num_chunks, host_chunks=64, **kw):
    """(config, keys, toks, kvs): ``num_chunks`` chunks written to disk; a store opened on the config starts
    with an empty host tier of ``host_chunks`` slots."""
    keys, toks, kvs = prompt_chunks(layout, num_chunks, seed=7)
    cfg = store_config(layout, host_chunks=host_chunks, disk_dir=tmp_path, disk_chunks=4 * num_chunks,
                       io_threads=IO_THREADS, **kw)
    with TieredStore(cfg, layout) as store:
        assert all(store.put(k, t, kv) for k, t, kv in zip(keys, toks, kvs))
    return cfg, keys, toks, kvs


class _ReadProbe:
    """Wraps a disk tier's read to count reads in flight at once. The first reads wait until ``gather``
    of them are in flight together (or ``wait_s`` passed), so overlap is observed, never timed; a read of
    ``hold[0]`` waits until ``hold[1]`` reads have begun."""

    def __init__(self, disk, gather: int, wait_s: float = 10.0, hold: tuple[str, int] | None = None) -> None:
        self._read, self._gather, self._wait_s, self._hold = disk.read, gather, wait_s, hold
        self._cond = threading.Condition()
        self._gathered = False
        self.active = self.most = self.calls = 0
        self.on_io_thread = []
        disk.read = self.read

    def read(self, key, max_bytes=None):
        with self._cond:
            self.active += 1
            self.calls += 1
            self.most = max(self.most, self.active)
            self.on_io_thread.append(on_io_thread())
            self._gathered |= self.active >= self._gather
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._gathered, self._wait_s)
            if self._hold is not None and key == self._hold[0]:
                self._cond.wait_for(lambda: self.calls >= self._hold[1], self._wait_s)
        try:
            return self._read(key, max_bytes=max_bytes)
        finally:
            with self._cond:
                self.active -= 1


def test_many_disk_chunks_come_back_byte_exact_in_key_order(layout, tmp_path):
    """Every chunk equals what was put, in key order; each counted once as a disk hit."""
    cfg, keys, toks, kvs = _on_disk(layout, tmp_path, 23)
    with TieredStore(cfg, layout) as store:
        got = store.get(keys, toks)
        assert len(got) == 23 and all(_equal(a, b) for a, b in zip(got, kvs))
        st = store.stats()
        assert st.hit_chunks["disk"] == 23 and st.hit_chunks["host"] == 0 and st.miss_chunks == 0
        assert st.host_entries == 23  # all promoted


def test_disk_reads_overlap_within_the_window(layout, tmp_path):
    """A get of many disk chunks has io_threads reads in flight at once, never more, on the I/O pool."""
    cfg, keys, toks, kvs = _on_disk(layout, tmp_path, 12)
    with TieredStore(cfg, layout) as store:
        probe = _ReadProbe(store.disk, gather=IO_THREADS)
        got = store.get(keys, toks)
        assert len(got) == 12 and all(_equal(a, b) for a, b in zip(got, kvs))
        assert probe.most == IO_THREADS and probe.calls == 12
        assert all(probe.on_io_thread)


def test_borrow_reads_disk_chunks_in_parallel(layout, tmp_path):
    """borrow lends byte-exact views of disk chunks read ahead on the pool, and counts each hit once."""
    cfg, keys, toks, kvs = _on_disk(layout, tmp_path, 10)
    with TieredStore(cfg, layout) as store:
        probe = _ReadProbe(store.disk, gather=IO_THREADS)
        with store.borrow(keys, toks) as loan:
            assert len(loan) == 10 and all(_equal(a, b) for a, b in zip(loan, kvs))
        assert probe.most == IO_THREADS
        assert store.stats().hit_chunks["disk"] == 10 and store.stats().hit_chunks["host"] == 0


def test_corrupt_chunk_in_the_middle_ends_the_hit_and_is_quarantined(layout, tmp_path):
    """Chunks after a corrupt one are neither returned, counted, promoted nor quarantined (read ahead or not)."""
    cfg, keys, toks, kvs = _on_disk(layout, tmp_path, 10)
    with TieredStore(cfg, layout) as store:
        victim = store.disk.path(keys[4])
        blob = victim.read_bytes()
        victim.write_bytes(blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:])
        # The corrupt chunk's read waits until keys 5..7 (its window) are being read too.
        probe = _ReadProbe(store.disk, gather=IO_THREADS, hold=(keys[4], 4 + IO_THREADS))
        got = store.get(keys, toks)
        assert len(got) == 4 and all(_equal(a, b) for a, b in zip(got, kvs))
        assert probe.calls >= 4 + IO_THREADS  # chunks beyond the corrupt one were read ahead
        st = store.stats()
        assert st.hit_chunks["disk"] == 4 and st.miss_chunks == 1
        assert st.corrupt_chunks == 1 and st.disk_quarantined == 1 and not victim.exists()
        assert st.host_entries == 4  # only the returned chunks were promoted
        assert all(store.disk.path(k).exists() for k in keys[5:])
        rest = store.get(keys[5:], toks[5:])
        assert len(rest) == 5 and all(_equal(a, b) for a, b in zip(rest, kvs[5:]))


def test_missing_chunk_in_the_middle_counts_one_miss(layout, tmp_path):
    """A deleted file ends the hit: hits count only returned chunks, the miss is counted once."""
    cfg, keys, toks, kvs = _on_disk(layout, tmp_path, 9)
    with TieredStore(cfg, layout) as store:
        store.disk.path(keys[3]).unlink()
        got = store.get(keys, toks)
        assert len(got) == 3 and all(_equal(a, b) for a, b in zip(got, kvs))
        st = store.stats()
        assert st.hit_chunks["disk"] == 3 and st.miss_chunks == 1 and st.corrupt_chunks == 0
        assert st.host_entries == 3


def test_token_mismatch_on_disk_ends_the_hit(layout, tmp_path):
    """A chunk whose stored token ids differ from the request's is a miss (quarantined), read ahead or not."""
    cfg, keys, toks, kvs = _on_disk(layout, tmp_path, 8)
    wrong = [list(t) for t in toks]
    wrong[5][0] += 1
    with TieredStore(cfg, layout) as store:
        got = store.get(keys, wrong)
        assert len(got) == 5 and all(_equal(a, b) for a, b in zip(got, kvs))
        st = store.stats()
        assert st.hit_chunks["disk"] == 5 and st.miss_chunks == 1 and st.corrupt_chunks == 1


def test_host_then_disk_counts_each_tier_exactly(layout, tmp_path):
    """Leading host chunks are served from memory, the disk tail read ahead; counters per tier are exact."""
    cfg, keys, toks, kvs = _on_disk(layout, tmp_path, 10)
    with TieredStore(cfg, layout) as store:
        assert len(store.get(keys[:3], toks[:3])) == 3  # promotes the first three
        probe = _ReadProbe(store.disk, gather=IO_THREADS)
        got = store.get(keys, toks)
        assert len(got) == 10 and all(_equal(a, b) for a, b in zip(got, kvs))
        assert probe.calls == 7  # host chunks are never read from disk
        st = store.stats()
        assert st.hit_chunks["host"] == 3 and st.hit_chunks["disk"] == 10


def test_out_buffers_receive_disk_chunks(layout, tmp_path):
    """With out=, each disk chunk read ahead lands in its own buffer, and the returned tensor is that buffer."""
    cfg, keys, toks, kvs = _on_disk(layout, tmp_path, 7)
    out = [torch.full_like(kv, 3.0) for kv in kvs]
    with TieredStore(cfg, layout) as store:
        got = store.get(keys, toks, out=out)
        assert len(got) == 7
        for buf, view, kv in zip(out, got, kvs):
            assert view.data_ptr() == buf.data_ptr() and _equal(buf, kv)


def test_promotion_never_overfills_the_host_tier(layout, tmp_path):
    """With 3 host slots, a get and a borrow of 12 disk chunks return them all and keep host memory within budget."""
    cfg, keys, toks, kvs = _on_disk(layout, tmp_path, 12, host_chunks=3)
    with TieredStore(cfg, layout) as store:
        got = store.get(keys, toks)
        assert len(got) == 12 and all(_equal(a, b) for a, b in zip(got, kvs))
        st = store.stats()
        assert st.host_entries == 3 and st.host_bytes <= st.host_capacity_bytes == 3 * layout.chunk_bytes
        with store.borrow(keys, toks) as loan:
            assert len(loan) == 12 and all(_equal(a, b) for a, b in zip(loan, kvs))
            st = store.stats()
            assert st.host_entries <= 3 and st.host_bytes <= st.host_capacity_bytes


def test_get_on_an_io_thread_reads_inline(layout, tmp_path):
    """A get running on the store's own I/O pool reads one chunk at a time on that thread: no deadlock."""
    cfg, keys, toks, kvs = _on_disk(layout, tmp_path, 8)
    with TieredStore(cfg, layout) as store:
        probe = _ReadProbe(store.disk, gather=2, wait_s=0.05)
        got = store._pool.submit(store.get, keys, toks).result(timeout=60)
        assert len(got) == 8 and all(_equal(a, b) for a, b in zip(got, kvs))
        assert probe.most == 1 and probe.calls == 8 and all(probe.on_io_thread)


def test_bandwidth_is_recorded_once_per_get(layout, tmp_path):
    """The cost model sees one disk observation for the whole get: all returned bytes over the elapsed time."""
    cfg, keys, toks, kvs = _on_disk(layout, tmp_path, 6)
    with TieredStore(cfg, layout) as store:
        seen = []
        store.cost.record_load = lambda tier, nbytes, seconds: seen.append((tier, nbytes, seconds))
        assert len(store.get(keys, toks)) == 6
        assert len(seen) == 1 and seen[0][:2] == (Tier.DISK, 6 * layout.chunk_bytes) and seen[0][2] > 0


def test_fewer_token_lists_than_keys_is_a_value_error(layout, tmp_path):
    """get and borrow refuse token id lists shorter than the keys, naming both counts."""
    cfg, keys, toks, kvs = _on_disk(layout, tmp_path, 3)
    with TieredStore(cfg, layout) as store:
        with pytest.raises(ValueError, match="2 token id lists for 3 keys"):
            store.get(keys, toks[:2])
        with pytest.raises(ValueError, match="2 token id lists for 3 keys"):
            with store.borrow(keys, toks[:2]):
                pass
        assert store.stats().hit_chunks["disk"] == 0
