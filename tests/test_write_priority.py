"""Background writes run below the engine's CPU priority, on threads apart from the reads."""

import os
import threading

import pytest

from conftest import prompt_chunks, store_config
from lmcache_sgl import TieredStore
from lmcache_sgl.config import ConfigError

pytestmark = pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread priority is a Linux feature")


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def _writer_tid() -> int:
    return next(t.native_id for t in threading.enumerate() if t.name == "lmcache-sgl-writer")


@pytest.mark.parametrize("write_nice", [10, 0])
def test_write_threads_run_write_nice_steps_below_the_caller(layout, tmp_path, write_nice):
    base = _nice(threading.get_native_id())
    cfg = store_config(layout, host_chunks=4, disk_dir=tmp_path / "d", disk_chunks=16).replace(write_nice=write_nice)
    keys, toks, kvs = prompt_chunks(layout, 3)
    with TieredStore(cfg, layout) as store:
        for k, t, kv in zip(keys, toks, kvs):
            assert store.put(k, t, kv)
        assert store.flush().written == 3 or store.stats().disk_entries == 3
        writes = store._writer._pool.submit(lambda: _nice(threading.get_native_id())).result()
        reads = store._pool.submit(lambda: _nice(threading.get_native_id())).result()
        writer = _nice(_writer_tid())
    expected = min(19, base + write_nice)
    assert writes == expected and writer == expected
    assert reads == base  # reads that requests wait on keep the engine's priority
    assert _nice(threading.get_native_id()) == base


def test_write_nice_out_of_range_is_a_config_error(layout):
    with pytest.raises(ConfigError, match="write_nice"):
        store_config(layout, host_chunks=1).replace(write_nice=20)
