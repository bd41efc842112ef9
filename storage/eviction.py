"""Eviction orders for the host and disk tiers.

A policy only orders keys; the tier decides which of them may go (pinned or
in-flight entries are skipped). Contract for every policy:
  - ``add`` a key once, ``remove`` it once; ``touch`` marks a use.
  - ``coldest()`` yields the current keys, coldest first. The caller must not
    add or remove keys while iterating; collect victims first.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Iterator


class LRUPolicy:
    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()  # oldest use first

    def add(self, key: str) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def coldest(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


class FIFOPolicy(LRUPolicy):
    def touch(self, key: str) -> None:
        pass  # insertion order only


class LFUPolicy:
    """Least frequently used first; ties go to the least recently added."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._buckets: defaultdict[int, OrderedDict[str, None]] = defaultdict(OrderedDict)

    def add(self, key: str) -> None:
        self.remove(key)
        self._count[key] = 1
        self._buckets[1][key] = None

    def touch(self, key: str) -> None:
        count = self._count.get(key)
        if count is None:
            return
        self._drop(key, count)
        self._count[key] = count + 1
        self._buckets[count + 1][key] = None

    def remove(self, key: str) -> None:
        count = self._count.pop(key, None)
        if count is not None:
            self._drop(key, count)

    def _drop(self, key: str, count: int) -> None:
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]

    def coldest(self) -> Iterator[str]:
        for count in sorted(self._buckets):
            yield from self._buckets[count]

    def __len__(self) -> int:
        return len(self._count)


POLICIES = {"LRU": LRUPolicy, "FIFO": FIFOPolicy, "LFU": LFUPolicy}


def make_policy(name: str) -> LRUPolicy | LFUPolicy:
    try:
        return POLICIES[name.upper()]()
    except KeyError:
        raise ValueError(f"cache_policy {name!r} is unknown; allowed: {sorted(POLICIES)}") from None
