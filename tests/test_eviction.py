"""Eviction orders: LRU, FIFO and LFU give the documented victim order."""

import pytest

from lmcache_sgl.storage.eviction import make_policy


def _order(policy):
    return list(policy.coldest())


def test_lru_moves_touched_keys_last():
    p = make_policy("LRU")
    for k in "abcd":
        p.add(k)
    p.touch("a")
    p.remove("c")
    assert _order(p) == ["b", "d", "a"]


def test_fifo_ignores_use():
    p = make_policy("fifo")
    for k in "abc":
        p.add(k)
    p.touch("a")
    assert _order(p) == ["a", "b", "c"]


def test_lfu_orders_by_count_then_age():
    p = make_policy("LFU")
    for k in "abcd":
        p.add(k)
    for k in "aab":
        p.touch(k)
    p.remove("d")
    assert _order(p) == ["c", "b", "a"] and len(p) == 3


def test_unknown_policy_lists_allowed():
    with pytest.raises(ValueError, match=r"allowed: \['FIFO', 'LFU', 'LRU'\]"):
        make_policy("MRU")
