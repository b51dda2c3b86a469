"""Id and Maglev-range allocation for the map writer.

Ids (service, frontend, backend) are small and dense (1..max-1, 0 = none) so
they index the per-CPU stats arrays directly. A released id is not reused
while unused ids remain: a conntrack entry may still name a removed backend,
and it must find "gone" (and reset or re-balance the flow), not a stranger
that inherited the id. Everything here is rebuilt from the maps' contents on
agent start, so nothing is persisted twice.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Iterable


class IdExhausted(RuntimeError):
    """No id or slot range left: the map limit (loader Limits) is too small."""


class IdAllocator:
    """Ids in [1, limit): fresh ids from a high-water mark first, then released ones, oldest first."""

    def __init__(self, limit: int, in_use: Iterable[int] = ()):
        self.limit = limit
        used = sorted(set(in_use))
        if used and (used[0] < 1 or used[-1] >= limit):
            raise ValueError(f"ids in use out of range [1, {limit}): {used[0]}..{used[-1]}")
        self._next = (used[-1] + 1) if used else 1
        used_set = set(used)
        # Holes below the high-water mark were released by a previous run.
        self._released: deque[int] = deque(i for i in range(1, self._next) if i not in used_set)

    def allocate(self) -> int:
        if self._next < self.limit:
            self._next += 1
            return self._next - 1
        if self._released:
            return self._released.popleft()
        raise IdExhausted(f"all {self.limit - 1} ids in use")

    def allocate_many(self, count: int) -> list[int]:
        """`count` ids at once, in the order allocate() would give them; none if they do not all fit."""
        fresh = min(count, self.limit - self._next)
        if count - fresh > len(self._released):
            raise IdExhausted(f"all {self.limit - 1} ids in use")
        out = list(range(self._next, self._next + fresh))
        self._next += fresh
        out += [self._released.popleft() for _ in range(count - fresh)]
        return out

    def release(self, ident: int) -> None:
        self._released.append(ident)


class SlotRanges:
    """First-fit allocator of [offset, offset + size) ranges in the flat lb_maglev array."""

    def __init__(self, capacity: int, in_use: Iterable[tuple[int, int]] = ()):
        self.capacity = capacity
        self._free: list[tuple[int, int]] = []   # sorted, non-adjacent (offset, size)
        pos = 0
        for off, size in sorted(r for r in in_use if r[1] > 0):
            if off < pos or off + size > capacity:
                raise ValueError(f"Maglev range {off}+{size} overlaps another or exceeds {capacity} slots")
            if off > pos:
                self._free.append((pos, off - pos))
            pos = off + size
        if pos < capacity:
            self._free.append((pos, capacity - pos))

    @property
    def free_slots(self) -> int:
        return sum(size for _, size in self._free)

    def allocate(self, size: int) -> int:
        for i, (off, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, free - size)
                return off
        raise IdExhausted(f"no free run of {size} Maglev slots ({self.free_slots} free in total)")

    def release(self, offset: int, size: int) -> None:
        if size <= 0:
            return
        i = bisect.bisect_left(self._free, (offset, 0))
        self._free.insert(i, (offset, size))
        # Merge with the neighbours so large tables keep finding room.
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            prev_off, prev_size = self._free[i - 1]
            self._free[i - 1] = (prev_off, prev_size + self._free[i][1])
            del self._free[i]
