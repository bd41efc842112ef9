"""The fault campaign's host-budget case (see fault_campaign.py): a long random workload.

Puts, checked gets, loans held across later operations, pins, removals and
flushes on a store with a small host tier, a disk tier and a short write
queue. After every step the host tier's bytes stay within its capacity, its
slots within the allocation, and the in-memory write-backs within the queue.
Every hit, and every borrowed view while its loan is held, is checked.
"""

from __future__ import annotations

import random

from lmcache_sgl import TieredStore


def _check_budget(store: TieredStore, res, step: int, cap: int) -> None:
    st = store.stats()
    res.outcomes["most host bytes"] = max(res.outcomes["most host bytes"], st.host_bytes)
    res.outcomes["most pending writes"] = max(res.outcomes["most pending writes"], st.pending_writes)
    res.check(st.host_bytes <= st.host_capacity_bytes, f"step {step}: host tier holds {st.host_bytes} bytes "
                                                       f"over its capacity {st.host_capacity_bytes}")
    # Write-backs wait in memory: the queue, plus one being written and the write-through copies of host entries.
    res.check(st.pending_writes <= cap, f"step {step}: {st.pending_writes} pending writes, more than {cap}")


def _borrow(store: TieredStore, ref, i: int, res, loans: list) -> None:
    cm = store.borrow([ref.key(i)], [ref.tokens(i)])
    loan = cm.__enter__()
    for view in loan:
        res.outcomes["borrowed views verified"] += ref.verify(view, i, res)
    loans.append((cm, loan, i))


def _release(ref, res, loans: list, rng: random.Random) -> None:
    cm, loan, i = loans.pop(rng.randrange(len(loans)))
    for view in loan:  # still pinned: nothing may have overwritten the slot meanwhile
        res.outcomes["views intact at release"] += ref.verify(view, i, res)
    cm.__exit__(None, None, None)


def host_budget_workload(res, ref, cfg, layout, steps: int, rng: random.Random) -> None:
    store = TieredStore(cfg, layout)
    host_slots = int(cfg.host_bytes // layout.chunk_bytes)
    cap = cfg.max_pending_writes + 1 + host_slots
    res.check(store.stats().host_capacity_bytes <= cfg.host_bytes, "the host allocation exceeds host_bytes")
    loans: list = []
    pins: list[int] = []
    try:
        for step in range(steps):
            op, i = rng.random(), rng.randrange(ref.size)
            res.tries += 1
            if op < 0.45:
                res.outcomes["puts accepted" if ref.put(store, i) else "puts dropped"] += 1
            elif op < 0.8:
                res.outcomes["hits verified" if ref.get(store, i, res) else "misses"] += 1
            elif op < 0.88 and len(loans) < 3:
                _borrow(store, ref, i, res, loans)
            elif op < 0.93 and loans:
                _release(ref, res, loans, rng)
            elif op < 0.96:
                if store.pin([ref.key(i)]):
                    pins.append(i)
                if len(pins) > 4:
                    store.unpin([ref.key(pins.pop(0))])
            elif op < 0.99:
                store.remove(ref.key(i))
            else:
                store.flush()
            _check_budget(store, res, step, cap)
        while loans:
            _release(ref, res, loans, rng)
    finally:
        store.close()
