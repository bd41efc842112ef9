"""Properties of any put/get/pin/flush sequence, also with a disk that fails for a while.

- budgets hold: host and disk bytes never exceed what is configured;
- a chunk just put (put returned True) reads back byte-exact at once, while
  the accepted chunks fit the cache;
- a get returns the right bytes or nothing, never other bytes;
- nothing is lost silently: while the accepted chunks fit the cache (host
  slots or disk files), every one of them reads back, unless the store counted
  a write it gave up (``writes_abandoned``);
- a pinned chunk is never evicted.
"""

import tempfile

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import prompt_chunks, store_config
from lmcache_sgl import CacheConfig, ChunkLayout, ModelFingerprint, TieredStore
from lmcache_sgl.keys import token_bytes
from lmcache_sgl.storage.chunk_file import encode_chunk

LAYOUT = ChunkLayout(ModelFingerprint("prop", "float16", 1, 1, 8), 16)
KEYS, TOKS, KVS = prompt_chunks(LAYOUT, 12, seed=7)


def _largest_file() -> int:
    cfg = CacheConfig()
    return max(len(encode_chunk(k, LAYOUT.fingerprint.to_dict(), token_bytes(t), kv, codec=cfg.disk_codec,
                                byte_shuffle=cfg.byte_shuffle)) for k, t, kv in zip(KEYS, TOKS, KVS))


LARGEST_FILE = _largest_file()  # bytes; the disk budget is sized in such files

op = st.tuples(st.sampled_from(["put", "get", "pin", "unpin", "flush", "break_disk", "fix_disk"]),
               st.integers(0, len(KEYS) - 1))


class _Disk:
    """Wraps a store's disk tier ``write``: returns False while ``broken``."""

    def __init__(self, store):
        self.broken = False
        if store._disk is not None:
            real = store._disk.write
            store._disk.write = lambda key, blob: not self.broken and real(key, blob)


def _reads_back(store, i) -> bool:
    got = store.get([KEYS[i]], [TOKS[i]])
    return bool(got) and got[0].view(torch.int16).equal(KVS[i].view(torch.int16))


# Always tried: a flush (0) or the background writer (1) meets a broken disk, then the disk works again.
@example(ops=[("put", 0), ("break_disk", 0), ("flush", 0), ("fix_disk", 0), ("put", 1), ("get", 0)],
         host_chunks=1, disk_files=4, policy="LRU")
@example(ops=[("break_disk", 0), ("put", 9), ("flush", 0), ("get", 9)], host_chunks=0, disk_files=2, policy="LFU")
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=40), host_chunks=st.integers(0, 4),
       disk_files=st.integers(0, 8), policy=st.sampled_from(["LRU", "FIFO", "LFU"]))
def test_budgets_hold_and_nothing_is_lost_silently(ops, host_chunks, disk_files, policy):
    with tempfile.TemporaryDirectory() as root:
        disk_dir = root if disk_files else None
        cfg = store_config(LAYOUT, host_chunks, disk_dir, disk_files * LARGEST_FILE / LAYOUT.chunk_bytes,
                           cache_policy=policy, max_pending_writes=2)
        disk_files = cfg.disk_bytes // LARGEST_FILE if disk_dir else 0  # rounding of the GiB config
        capacity = max(host_chunks, disk_files)  # chunks the cache holds for sure
        with TieredStore(cfg, LAYOUT) as store:
            disk = _Disk(store)
            accepted: set[int] = set()
            pinned: list[int] = []
            for name, i in ops:
                if name == "put":
                    if store.put(KEYS[i], TOKS[i], KVS[i]):
                        accepted.add(i)
                        fits = len(accepted) <= capacity and store.stats().writes_abandoned == 0
                        assert not fits or _reads_back(store, i), "a chunk just put must read back"
                elif name == "get":
                    got = store.get([KEYS[i]], [TOKS[i]])
                    assert not got or got[0].view(torch.int16).equal(KVS[i].view(torch.int16))
                elif name == "pin":
                    if store.pin([KEYS[i]]):
                        pinned.append(i)
                elif name == "unpin" and i in pinned:
                    store.unpin([KEYS[i]])
                    pinned.remove(i)
                elif name in ("break_disk", "fix_disk"):
                    disk.broken = name == "break_disk"
                elif name == "flush":
                    store.flush()
                s = store.stats()
                assert s.host_bytes <= s.host_capacity_bytes <= cfg.host_bytes
                assert s.disk_bytes <= cfg.disk_bytes
                if len(accepted) <= capacity and s.writes_abandoned == 0:
                    lost = [j for j in sorted(accepted) if not _reads_back(store, j)]
                    assert not lost, f"chunks {lost} lost silently ({len(accepted)} fit in {capacity})"
            for i in set(pinned):  # a pinned chunk is never evicted
                assert store.lookup([KEYS[i]]).num_hits == 1
