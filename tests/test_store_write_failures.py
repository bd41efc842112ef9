"""Failed writes and borrowed slots: a chunk is never silently lost, no pin is ever leaked.

Items 5, 9 and 10 of issue 10: a failed write-back stays dirty and is retried
(within a budget, then counted as abandoned); a write that raises is a counted
failure that leaves no pin; borrowed host slots stay pinned until the transfer
reading them has completed.
"""

import threading
from types import SimpleNamespace

import pytest
import torch

from conftest import prompt_chunks, store_config
from lmcache_sgl import Tier, TieredStore
from lmcache_sgl.storage.disk_tier import DiskTier
from lmcache_sgl.triton_kernels import TransferStream
from lmcache_sgl.write_back import MAX_WRITE_ATTEMPTS, PendingWrite, RetryQueue


def _equal(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


class _Sink:
    """Wraps the disk tier's ``write``: fails (returns False or raises) while ``broken``."""

    def __init__(self, disk, fail_with=None):
        self.real_write, self.broken, self.fail_with, self.calls = disk.write, True, fail_with, 0

    def write(self, key, blob):
        self.calls += 1
        if not self.broken:
            return self.real_write(key, blob)
        if self.fail_with is not None:
            raise self.fail_with
        return False


def _broken_disk(store, monkeypatch, fail_with=None) -> _Sink:
    sink = _Sink(store._disk, fail_with)
    monkeypatch.setattr(store._disk, "write", sink.write)
    return sink


def _on_disk(root, key) -> bool:
    return (root / key[:2] / f"{key}.kv").is_file()


# ---- item 5: a failed write stays dirty, is retried, and is not a writeback -------


def test_flush_keeps_a_failed_write_dirty_until_the_disk_works(layout, tmp_path, monkeypatch):
    """A flush whose disk write fails counts no writeback; the chunk reaches disk once the disk works."""
    keys, toks, kvs = prompt_chunks(layout, 3)
    with TieredStore(store_config(layout, host_chunks=2, disk_dir=tmp_path, disk_chunks=100,
                                  disk_write_policy="write_back"), layout) as store:  # one write: the flush's
        sink = _broken_disk(store, monkeypatch)
        assert store.put(keys[0], toks[0], kvs[0])
        store.flush()
        s = store.stats()
        assert (s.writebacks, s.write_failures) == (0, 1)
        assert store.lookup(keys[:1]).tiers == (Tier.HOST,) and _equal(store.get(keys[:1])[0], kvs[0])
        sink.broken = False
        for k, t, kv in zip(keys[1:], toks[1:], kvs[1:]):  # the third put evicts chunk 0: written back
            assert store.put(k, t, kv)
        store.flush_pending()
        assert _on_disk(tmp_path, keys[0]) and store.stats().writebacks == 1
    with TieredStore(store_config(layout, host_chunks=0, disk_dir=tmp_path, disk_chunks=100), layout) as store:
        assert _equal(store.get(keys[:1], toks[:1])[0], kvs[0])


@pytest.mark.parametrize("host_chunks", [0, 1])
def test_failed_write_back_stays_readable_and_a_later_flush_writes_it(layout, tmp_path, monkeypatch, host_chunks):
    """The background writer's failure keeps the chunk served from memory; a flush retries it."""
    keys, toks, kvs = prompt_chunks(layout, 2)
    with TieredStore(store_config(layout, host_chunks, tmp_path, disk_chunks=100), layout) as store:
        sink = _broken_disk(store, monkeypatch)
        for k, t, kv in zip(keys, toks, kvs):  # with one host slot, the second put evicts chunk 0
            assert store.put(k, t, kv)
        store.flush_pending()
        assert sink.calls >= 1 and not _on_disk(tmp_path, keys[0])
        got = store.get(keys, toks)
        assert len(got) == 2 and all(_equal(a, b) for a, b in zip(got, kvs))
        sink.broken = False
        store.flush()
        assert all(_on_disk(tmp_path, k) for k in keys)
        s = store.stats()
        assert s.writebacks == 2 and s.write_failures >= 1 and s.writes_abandoned == 0 and s.pending_writes == 0


def test_a_permanently_broken_disk_is_given_up_after_the_retry_budget(layout, tmp_path, monkeypatch):
    """Retries are bounded: after MAX_WRITE_ATTEMPTS failures the chunk is counted abandoned, no more writes."""
    keys, toks, kvs = prompt_chunks(layout, 1)
    with TieredStore(store_config(layout, host_chunks=2, disk_dir=tmp_path, disk_chunks=100), layout) as store:
        sink = _broken_disk(store, monkeypatch)
        store.put(keys[0], toks[0], kvs[0])
        for _ in range(MAX_WRITE_ATTEMPTS + 3):
            store.flush()
        s = store.stats()
        assert sink.calls == MAX_WRITE_ATTEMPTS
        assert (s.writebacks, s.write_failures, s.writes_abandoned) == (0, MAX_WRITE_ATTEMPTS, 1)
        assert _equal(store.get(keys, toks)[0], kvs[0])  # still served from host until evicted


def test_background_retries_are_bounded_too(layout, tmp_path, monkeypatch):
    """A chunk evicted onto a broken disk is retried by later puts, then abandoned and counted."""
    monkeypatch.setattr("lmcache_sgl.write_back.RETRY_DELAY_S", 0.0)
    keys, toks, kvs = prompt_chunks(layout, 2 + 2 * MAX_WRITE_ATTEMPTS)
    cfg = store_config(layout, host_chunks=0, disk_dir=tmp_path, disk_chunks=100, max_pending_writes=64)
    with TieredStore(cfg, layout) as store:
        sink = _broken_disk(store, monkeypatch)
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
            store.flush_pending()
        s = store.stats()
        assert s.writes_abandoned >= 1 and s.write_failures == sink.calls
        assert sink.calls <= len(keys) * MAX_WRITE_ATTEMPTS
        assert s.pending_writes == len(keys) - s.writes_abandoned  # everything else is still served


def test_retry_queue_backs_off_and_is_bounded(layout):
    """A failed job waits its back-off; it is given up at MAX_WRITE_ATTEMPTS or when the queue is full."""
    kv = torch.ones(2, dtype=torch.float16)
    retries = RetryQueue(max_jobs=2)
    job = retries.keep(PendingWrite("a", kv, b"", 0))
    assert job.failures == 1 and retries.due() == [] and len(retries) == 1  # backing off
    assert retries.keep(PendingWrite("b", kv, b"", 0)) is not None
    assert retries.keep(PendingWrite("c", kv, b"", 0)) is None  # full: "a" and "b" wait
    assert [j.key for j in retries.take_all()] == ["a", "b"] and len(retries) == 0
    for _ in range(MAX_WRITE_ATTEMPTS - 2):  # each retry is taken out, written, and fails again
        job = retries.keep(job)
        assert [j is job for j in retries.take_all()] == [True]
    assert retries.keep(job) is None and len(retries) == 0  # the last allowed attempt failed


def test_a_background_retry_waits_for_its_back_off(layout, tmp_path, monkeypatch):
    """Puts right after a failure do not rewrite the failed chunk; a flush does, at once."""
    keys, toks, kvs = prompt_chunks(layout, 4)
    with TieredStore(store_config(layout, host_chunks=0, disk_dir=tmp_path, disk_chunks=100), layout) as store:
        sink = _broken_disk(store, monkeypatch)
        store.put(keys[0], toks[0], kvs[0])
        store.flush_pending()
        sink.broken = False
        for k, t, kv in zip(keys[1:], toks[1:], kvs[1:]):
            store.put(k, t, kv)
        store.flush_pending()
        assert not _on_disk(tmp_path, keys[0]) and sink.calls == 4
        store.flush()
        assert _on_disk(tmp_path, keys[0]) and sink.calls == 5


# ---- item 9: a write that raises is a counted failure and leaves no pin ----------


def test_disk_write_under_a_file_where_the_subdirectory_belongs_returns_false(layout, tmp_path):
    """A plain file named like a chunk's two-character subdirectory makes write fail, not raise."""
    disk = DiskTier(tmp_path, 1 << 20, "LRU")
    (tmp_path / "ab").write_text("not a directory")
    assert disk.write("ab" + "0" * 30, b"\x01\x02blob") is False
    assert disk.write_errors == 1 and len(disk) == 0


@pytest.mark.parametrize("failure", ["blocked_dir", "sink_raises"])
def test_a_flush_that_cannot_write_leaves_no_pin_behind(layout, tmp_path, monkeypatch, failure):
    """After a failed flush the entry is evictable again: a put that needs its slot succeeds."""
    keys, toks, kvs = prompt_chunks(layout, 2)
    with TieredStore(store_config(layout, host_chunks=1, disk_dir=tmp_path, disk_chunks=100,
                                  disk_write_policy="write_back"), layout) as store:  # one write: the flush's
        if failure == "blocked_dir":
            (tmp_path / keys[0][:2]).write_text("not a directory")
        else:
            _broken_disk(store, monkeypatch, fail_with=RuntimeError("sink bug"))
        assert store.put(keys[0], toks[0], kvs[0])
        store.flush()  # must not raise
        assert store.stats().write_failures == 1
        assert store.put(keys[1], toks[1], kvs[1])  # chunk 0 was not left pinned
        store.flush_pending()
        assert _equal(store.get(keys[:1], toks[:1])[0], kvs[0])  # still dirty: kept for a retry


# ---- item 10: borrowed slots stay pinned until the transfer reading them completes ----


class _FakeEvent:
    """Stands in for a CUDA event: ``query()`` is False until ``set()``."""

    def __init__(self):
        self._done = threading.Event()

    def query(self) -> bool:
        return self._done.is_set()

    def set(self) -> None:
        self._done.set()


def test_borrowed_slots_stay_pinned_until_the_transfer_completes(layout):
    """release(after=event) keeps the slots pinned past the with-block until the event completes."""
    keys, toks, kvs = prompt_chunks(layout, 3)
    with TieredStore(store_config(layout, host_chunks=2), layout) as store:
        for k, t, kv in zip(keys[:2], toks[:2], kvs[:2]):
            store.put(k, t, kv)
        transfer = _FakeEvent()
        with store.borrow(keys[:2], toks[:2]) as loan:
            assert len(loan) == 2 and all(_equal(v, kv) for v, kv in zip(loan, kvs))
            loan.release(after=transfer)
        assert not store.put(keys[2], toks[2], kvs[2])  # the transfer may still read both slots
        assert all(_equal(v, kv) for v, kv in zip(loan, kvs[:2]))
        transfer.set()
        assert store.put(keys[2], toks[2], kvs[2])
        assert store.stats().puts_dropped == 1


def test_release_after_a_complete_handle_unpins_at_once(layout):
    """On CPU a TransferStream handle is complete from the start: the slot is free right away."""
    keys, toks, kvs = prompt_chunks(layout, 2)
    with TieredStore(store_config(layout, host_chunks=1), layout) as store:
        store.put(keys[0], toks[0], kvs[0])
        with store.borrow(keys[:1]) as loan:
            with TransferStream("cpu").launch() as done:
                staged = loan[0].clone()
            loan.release(after=done)
            assert store.put(keys[1], toks[1], kvs[1])
        assert _equal(staged, kvs[0])


def test_exit_without_release_waits_for_the_current_stream_on_pinned_slots(layout, monkeypatch):
    """With pinned (CUDA) slots, leaving the block releases after an event on the current stream."""
    keys, toks, kvs = prompt_chunks(layout, 2)
    stream_done = _FakeEvent()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: SimpleNamespace(record_event=lambda: stream_done))
    with TieredStore(store_config(layout, host_chunks=1), layout) as store:
        store._host.pinned = True  # as on a CUDA machine
        store.put(keys[0], toks[0], kvs[0])
        with store.borrow(keys[:1]) as loan:
            assert len(loan) == 1
        assert not store.put(keys[1], toks[1], kvs[1])  # a kernel queued on the stream may still read it
        stream_done.set()
        assert store.put(keys[1], toks[1], kvs[1])


def test_release_rejects_an_object_that_is_not_an_event(layout):
    keys, toks, kvs = prompt_chunks(layout, 1)
    with TieredStore(store_config(layout, host_chunks=1), layout) as store:
        store.put(keys[0], toks[0], kvs[0])
        with store.borrow(keys) as loan:
            with pytest.raises(ValueError, match="query"):
                loan.release(after=object())
