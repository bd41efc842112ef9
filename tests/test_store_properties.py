"""Property: under any put/get/pin sequence, budgets hold and a get returns the right bytes or nothing."""

import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import prompt_chunks, store_config
from lmcache_sgl import ChunkLayout, ModelFingerprint, TieredStore

LAYOUT = ChunkLayout(ModelFingerprint("prop", "float16", 1, 1, 8), 16)
KEYS, TOKS, KVS = prompt_chunks(LAYOUT, 12, seed=7)

op = st.tuples(st.sampled_from(["put", "get", "pin", "unpin", "flush"]), st.integers(0, len(KEYS) - 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=40), host_chunks=st.integers(0, 4),
       disk_chunks=st.integers(0, 6), policy=st.sampled_from(["LRU", "FIFO", "LFU"]))
def test_budgets_hold_and_data_is_right(ops, host_chunks, disk_chunks, policy):
    with tempfile.TemporaryDirectory() as root:
        # Compressed files are about the raw size (random data), so size the disk budget in raw chunk bytes.
        disk_dir = root if disk_chunks else None
        cfg = store_config(LAYOUT, host_chunks, disk_dir, disk_chunks * 1.2, cache_policy=policy,
                           max_pending_writes=2)
        with TieredStore(cfg, LAYOUT) as store:
            pinned: list[int] = []
            for name, i in ops:
                if name == "put":
                    store.put(KEYS[i], TOKS[i], KVS[i])
                elif name == "get":
                    got = store.get([KEYS[i]], [TOKS[i]])
                    assert not got or got[0].view(torch.int16).equal(KVS[i].view(torch.int16))
                elif name == "pin":
                    if store.pin([KEYS[i]]):
                        pinned.append(i)
                elif name == "unpin" and i in pinned:
                    store.unpin([KEYS[i]])
                    pinned.remove(i)
                else:
                    store.flush()
                s = store.stats()
                assert s.host_bytes <= s.host_capacity_bytes <= cfg.host_bytes
                assert s.disk_bytes <= cfg.disk_bytes
            for i in set(pinned):  # a pinned chunk is never evicted
                assert store.lookup([KEYS[i]]).num_hits == 1
