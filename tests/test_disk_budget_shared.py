"""The disk budget holds for the directory, whoever writes into it.

Slack: a writer renames its file into place, then trims, so between the two the
chunk files may exceed the budget by the one chunk each writing process has in
flight (its temporary file or its just-renamed file). Measured after a write
returns in the writing process, the directory is within the budget.
"""

import os
from pathlib import Path

from conftest import run_in_processes
from lmcache_sgl.storage.disk_tier import USAGE_FILE, DiskTier, iter_chunk_files

BLOB = 4096
BUDGET = 6 * BLOB


def _blob(i: int) -> bytes:
    return (i.to_bytes(4, "little") * (BLOB // 4))[:BLOB]


def _key(owner: int, i: int) -> str:
    return f"{owner:02x}{i:030x}"


def dir_bytes(root: Path) -> int:
    """Bytes of every file under the chunk subdirectories, temporary files included."""
    total = 0
    for sub in root.iterdir():
        if sub.is_dir() and len(sub.name) == 2:
            for f in sub.iterdir():
                try:
                    total += f.stat().st_size
                except FileNotFoundError:
                    pass  # trimmed by the other process meanwhile
    return total


def test_two_tiers_writing_alternately_keep_the_directory_within_budget(tmp_path):
    """Each write leaves the directory (not only the writer's view) within the budget."""
    a, b = (DiskTier(tmp_path, BUDGET, "LRU") for _ in range(2))
    for i in range(20):
        for owner, tier in ((1, a), (2, b)):
            assert tier.write(_key(owner, i), _blob(i))
            assert dir_bytes(tmp_path) <= BUDGET
    assert a.used_bytes <= BUDGET and b.used_bytes <= BUDGET
    assert len(list(iter_chunk_files(tmp_path))) == BUDGET // BLOB  # full, not emptier than needed


def test_fresh_tier_trims_an_over_budget_directory_on_start(tmp_path):
    """Opening a directory over the budget trims it at once, coldest files (by mtime) first."""
    big = DiskTier(tmp_path, 100 * BLOB, "LRU")
    keys = [_key(1, i) for i in range(10)]
    for i, key in enumerate(keys):
        assert big.write(key, _blob(i))
        os.utime(big.path(key), (1_000_000 + i, 1_000_000 + i))  # key i is the i-th coldest
    small = DiskTier(tmp_path, 4 * BLOB, "LRU")
    assert dir_bytes(tmp_path) == 4 * BLOB
    assert sorted(f.key for f in iter_chunk_files(tmp_path)) == keys[6:]
    assert small.used_bytes == 4 * BLOB and small.evictions == 6


def test_eviction_takes_the_coldest_file_of_the_directory(tmp_path):
    """A writer evicts another process's colder files before its own, once it has rescanned."""
    a = DiskTier(tmp_path, 4 * BLOB, "LRU")
    b = DiskTier(tmp_path, 4 * BLOB, "LRU", rescan_interval_s=0)
    for i in range(3):
        assert a.write(_key(1, i), _blob(i))
        os.utime(a.path(_key(1, i)), (1_000_000 + i, 1_000_000 + i))
    for i in range(3):
        assert b.write(_key(2, i), _blob(10 + i))
    remaining = {f.key for f in iter_chunk_files(tmp_path)}
    assert remaining == {_key(1, 2), *(_key(2, i) for i in range(3))}


def test_files_vanishing_under_a_tier_are_misses_not_errors(tmp_path):
    """Files another process removed: reads miss, trimming skips them, the accounting recovers."""
    a = DiskTier(tmp_path, 4 * BLOB, "LRU", rescan_interval_s=0)
    for i in range(4):
        assert a.write(_key(1, i), _blob(i))
    for i in range(3):
        a.path(_key(1, i)).unlink()  # e.g. `lmcache-sgl prune` or another process's trim
    assert a.read(_key(1, 0)) is None
    for i in range(4, 8):
        assert a.write(_key(1, i), _blob(i))
        assert dir_bytes(tmp_path) <= 4 * BLOB
    assert sorted(f.key for f in iter_chunk_files(tmp_path)) == [_key(1, i) for i in range(4, 8)]
    assert a.used_bytes == 4 * BLOB


def _writer(root: str, owner: int, rounds: int, out) -> None:
    tier = DiskTier(root, BUDGET, "LRU")
    worst = 0
    for i in range(rounds):
        tier.write(_key(owner, i), _blob(owner * 1000 + i))
        worst = max(worst, dir_bytes(Path(root)))
    out.put(worst)


def test_two_processes_keep_the_directory_within_budget(tmp_path):
    """Two real processes writing at once: at most one chunk of slack, none once both are done."""
    worst = run_in_processes(_writer, [(str(tmp_path), owner, 40) for owner in (1, 2)])
    assert max(worst) <= BUDGET + BLOB, worst
    assert dir_bytes(tmp_path) <= BUDGET
    assert DiskTier(tmp_path, BUDGET, "LRU").used_bytes == dir_bytes(tmp_path)


def test_a_garbled_usage_file_is_rebuilt_from_the_directory(tmp_path):
    """A truncated or negative count is replaced by a rescan, not trusted and not a crash."""
    tier = DiskTier(tmp_path, 4 * BLOB, "LRU")
    for i in range(3):
        assert tier.write(_key(1, i), _blob(i))
    usage = tmp_path / USAGE_FILE
    for garbage in (b"\x01\x02", (-5).to_bytes(8, "little", signed=True)):
        usage.write_bytes(garbage)
        assert tier.write(_key(2, len(garbage)), _blob(99))
        assert tier.used_bytes == dir_bytes(tmp_path) <= 4 * BLOB
        assert int.from_bytes(usage.read_bytes(), "little") == tier.used_bytes
