"""The host (CPU RAM) tier: one allocation cut into fixed slots.

One slot holds one chunk (a partial chunk still takes a whole slot), so the
budget is exact: ``num_slots * slot_bytes <= capacity``, never exceeded.
The buffer is pinned when CUDA is available, so GPU copies run at full PCIe
speed and Triton kernels can read and write it zero-copy.

Not thread-safe: the owner (``TieredStore``) holds its lock around every call.

Entry states:
  - ``refs > 0``: pinned by a reader; never evicted or freed.
  - ``dirty``: not yet written to a lower tier; evicting it requires a write-back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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


class Victim(NamedTuple):
    key: str
    entry: HostEntry


class HostTier:
    def __init__(self, capacity_bytes: int, slot_bytes: int, policy: str) -> None:
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes={slot_bytes} must be > 0")
        self.slot_bytes = slot_bytes
        self.num_slots = capacity_bytes // slot_bytes
        pin = torch.cuda.is_available()
        self._buf = torch.empty(self.num_slots * slot_bytes, dtype=torch.uint8, pin_memory=pin)  # [slots*slot_bytes]
        self._free = list(range(self.num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._entries: dict[str, HostEntry] = {}
        self._policy = make_policy(policy)

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

    def victims(self, count: int) -> list[Victim]:
        """Up to ``count`` coldest unpinned entries, without removing them."""
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
