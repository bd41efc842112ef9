"""Two processes writing and reading one cache directory at once: no errors, no wrong data, one budget."""

import sys
from pathlib import Path

from conftest import run_in_processes, store_config
from lmcache_sgl.storage.disk_tier import iter_chunk_files

TESTS = str(Path(__file__).parent)
DISK_CHUNKS = 12  # the budget of each process, in raw chunk sizes; both share one directory


def _layout():
    from lmcache_sgl import ChunkLayout, ModelFingerprint
    return ChunkLayout(ModelFingerprint("shared", "bfloat16", 2, 2, 16), 16)


def _worker(root: str, seed: int, rounds: int, out) -> None:
    sys.path.insert(0, TESTS)
    import torch
    from conftest import prompt_chunks, store_config
    from lmcache_sgl import TieredStore

    layout = _layout()
    # Both workers share prompts 0..2 and each has four of its own, 100*seed+j.
    prompts = [prompt_chunks(layout, 3, seed=s) for s in (*range(3), *(100 * seed + j for j in range(4)))]
    wrong = served = 0
    store = TieredStore(store_config(layout, host_chunks=1, disk_dir=root, disk_chunks=DISK_CHUNKS), layout)
    for r in range(rounds):
        keys, toks, kvs = prompts[(r * (seed + 1)) % len(prompts)]
        got = store.get(keys, toks)
        served += len(got)
        wrong += sum(not torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(got, kvs))
        for k, t, kv in zip(keys, toks, kvs):
            store.put(k, t, kv)
    store.close()
    out.put((wrong, served, store.stats().corrupt_chunks))


def test_two_processes_share_one_directory(tmp_path):
    results = run_in_processes(_worker, [(str(tmp_path), seed, 40) for seed in (1, 2)])
    assert all(wrong == 0 and corrupt == 0 for wrong, _, corrupt in results)
    assert sum(served for _, served, _ in results) > 0  # they did read each other's or their own files
    assert not list((tmp_path).rglob("*.tmp.*"))  # no temporary file left behind
    # 7 prompts of 3 chunks per process, 33 distinct chunks: nearly three budgets were written.
    budget = store_config(_layout(), host_chunks=1, disk_dir=tmp_path, disk_chunks=DISK_CHUNKS).disk_bytes
    on_disk = sum(f.size for f in iter_chunk_files(tmp_path))
    assert 0 < on_disk <= budget, (on_disk, budget)
