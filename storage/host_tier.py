"""The host (CPU RAM) tier: one allocation cut into fixed slots.

One slot holds one chunk (a partial chunk still takes a whole slot), so the
budget is exact: ``num_slots * slot_bytes <= capacity``, never exceeded.
The buffer is pinned when CUDA is available, so GPU copies run at full PCIe
speed and Triton kernels can read and write it zero-copy.

Not thread-safe: the owner (``TieredStore``) holds its lock around every call.

Entry states:
  - ``refs > 0``: pinned by a reader; never evicted or freed. A loan's pins
    may outlive the call that made them: ``unpin_after`` keeps them until the
    transfer reading the slots completes (its event's ``query()`` is True).
  - ``dirty``: not yet written to a lower tier; evicting it requires a write-back.
    ``write_failures`` counts failed writes of it; the store stops retrying
    (and clears ``dirty``) after ``MAX_WRITE_ATTEMPTS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .eviction import make_policy


@dataclass(slots=True)
class HostEntry:
    slot: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    token_ids: bytes  # int32 little-endian, a collision guard
    start_pos: int
    dirty: bool
    refs: int = 0
    write_failures: int = 0


class Victim(NamedTuple):
    key: str
    entry: HostEntry


class Loan(Sequence):
    """Chunks lent by ``TieredStore.borrow``: views of pinned host slots, or private copies.

    ``release(after=event)`` ends the loan once ``event.query()`` is True: pass
    the ``torch.cuda.Event`` or ``TransferHandle`` of the copies reading the
    views. Until then their slots stay pinned, so no put can overwrite them.
    ``release()`` (or ``after=None``) ends it now. Later calls do nothing.
    """

    __slots__ = ("_views", "_release", "released")

    def __init__(self, views: list[torch.Tensor], release: Callable[[object | None], None]) -> None:
        self._views = views  # [L, P, T, H, D] each
        self._release = release
        self.released = False

    def __getitem__(self, index):
        return self._views[index]

    def __len__(self) -> int:
        return len(self._views)

    def release(self, after: object | None = None) -> None:
        if after is not None and not callable(getattr(after, "query", None)):
            raise ValueError(f"release(after=...) takes None or an object with query() "
                             f"(torch.cuda.Event, TransferHandle), got {type(after).__name__}")
        if not self.released:
            self.released = True
            self._release(after)


class _Deferred(NamedTuple):
    entries: tuple[HostEntry, ...]  # one pin each, dropped when event completes
    event: object  # query() -> bool


class HostTier:
    def __init__(self, capacity_bytes: int, slot_bytes: int, policy: str) -> None:
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes={slot_bytes} must be > 0")
        self.slot_bytes = slot_bytes
        self.num_slots = capacity_bytes // slot_bytes
        pin = torch.cuda.is_available()
        self.pinned = pin  # GPU copies may read the slots asynchronously
        self._buf = torch.empty(self.num_slots * slot_bytes, dtype=torch.uint8, pin_memory=pin)  # [slots*slot_bytes]
        self._free = list(range(self.num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._entries: dict[str, HostEntry] = {}
        self._policy = make_policy(policy)
        self._deferred: list[_Deferred] = []  # loans whose transfer may still read their slots

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        return len(self._entries) * self.slot_bytes

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def entry(self, key: str) -> HostEntry | None:
        return self._entries.get(key)

    def view(self, entry: HostEntry) -> torch.Tensor:
        """The entry's bytes as a tensor of its dtype and shape (no copy)."""
        start = entry.slot * self.slot_bytes
        return self._buf[start:start + entry.nbytes].view(entry.dtype).view(entry.shape)

    def touch(self, key: str) -> None:
        self._policy.touch(key)

    def insert(self, key: str, kv: torch.Tensor, token_ids: bytes, start_pos: int, dirty: bool) -> HostEntry | None:
        """Copy ``kv`` into a free slot. Returns None when no slot is free (call ``victims`` first)."""
        nbytes = kv.numel() * kv.element_size()
        if nbytes > self.slot_bytes:
            raise ValueError(f"chunk of {nbytes} bytes exceeds the slot size {self.slot_bytes}")
        if not self._free:
            return None
        entry = HostEntry(self._free.pop(), nbytes, tuple(kv.shape), kv.dtype, token_ids, start_pos, dirty)
        self.view(entry).copy_(kv)
        self._entries[key] = entry
        self._policy.add(key)
        return entry

    def unpin_after(self, entries: Sequence[HostEntry], event: object | None) -> None:
        """Drop one pin of each entry now, or once ``event.query()`` is True."""
        if event is None or event.query():
            _unpin(entries)
        else:
            self._deferred.append(_Deferred(tuple(entries), event))

    def reap(self) -> None:
        """Drop the pins of loans whose transfer has completed (never blocks)."""
        waiting = []
        for loan in self._deferred:
            if loan.event.query():
                _unpin(loan.entries)
            else:
                waiting.append(loan)
        self._deferred = waiting

    def wait_for_loans(self) -> None:
        """Block until every deferred loan's transfer completed (events with ``synchronize()``)."""
        for loan in self._deferred:
            if callable(getattr(loan.event, "synchronize", None)):
                loan.event.synchronize()
        self.reap()

    def victims(self, count: int) -> list[Victim]:
        """Up to ``count`` coldest unpinned entries, without removing them."""
        self.reap()
        out = []
        for key in self._policy.coldest():
            if len(out) == count:
                break
            entry = self._entries[key]
            if entry.refs == 0:
                out.append(Victim(key, entry))
        return out

    def free_slots(self) -> int:
        return len(self._free)

    def remove(self, key: str) -> HostEntry | None:
        """Drop an entry and free its slot. A pinned entry is not removed (returns None)."""
        entry = self._entries.get(key)
        if entry is None or entry.refs > 0:
            return None
        del self._entries[key]
        self._policy.remove(key)
        self._free.append(entry.slot)
        return entry


def _unpin(entries: Sequence[HostEntry]) -> None:
    for e in entries:
        e.refs -= 1
