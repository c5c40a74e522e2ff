"""The allocator: which physical segments of a pool are free, used or reserved, and which to hand out next.

Pure data structure, no I/O: it prefers contiguous regions and the segment after the vdisk's neighbour."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable

FREE = 0
USED = 1
RESERVED = 2
LABEL = 3
_FREE_RUN = re.compile(b"\\x00+")

Segment = tuple[int, int]
Run = tuple[int, int, int]


class SegmentMap:
    """One byte of state per physical segment of one container; the first `label` segments hold its label."""

    def __init__(self, container_id: int, nsegments: int, label: int = 1) -> None:
        self.container_id = container_id
        self.state = bytearray(nsegments)
        label = min(label, nsegments)
        self.state[:label] = bytes([LABEL]) * label
        self.capacity = nsegments - label
        self.free = self.capacity
        self.cursor = label

    def __len__(self) -> int:
        return len(self.state)

    def set(self, pseg: int, value: int) -> None:
        old = self.state[pseg]
        if old == value:
            return
        self.free += (value == FREE) - (old == FREE)
        self.state[pseg] = value

    def find_run(self, count: int) -> int:
        """Start of a free run of count segments at or after the cursor (wrapping), or -1."""
        pattern = bytes(count)
        at = self.state.find(pattern, self.cursor)
        if at < 0:
            at = self.state.find(pattern, 0)
        return at

    def longest_run(self, limit: int) -> tuple[int, int]:
        """(start, length) of the longest free run, stopping early at one of limit segments."""
        best = (0, 0)
        for match in _FREE_RUN.finditer(self.state):
            length = match.end() - match.start()
            if length > best[1]:
                best = (match.start(), min(length, limit))
                if length >= limit:
                    break
        return best


class PoolAllocator:
    """Free-space map of one pool's containers plus its reserve of zeroed segments ready to hand out."""

    def __init__(self, containers: Iterable[tuple[int, int]], reserve_target: int = 64, label: int = 1) -> None:
        self.maps: dict[int, SegmentMap] = {cid: SegmentMap(cid, n, label) for cid, n in containers}
        self.reserve: dict[Segment, None] = {}
        self.in_flight: list[Run] = []
        self.granted: set[Segment] = set()
        self.reserve_target = reserve_target
        self.refilling: asyncio.Future[None] | None = None  # the background refill in progress, if one is

    @property
    def capacity(self) -> int:
        """Segments that can hold vdisk data."""
        return sum(m.capacity for m in self.maps.values())

    @property
    def used(self) -> int:
        """Segments referenced by vdisks (reserved segments count as free)."""
        return self.capacity - self.free

    @property
    def free(self) -> int:
        """Segments no vdisk maps: free, reserved, being zeroed for the reserve, or granted to an agent."""
        in_flight = sum(r[2] for r in self.in_flight)
        return sum(m.free for m in self.maps.values()) + len(self.reserve) + in_flight + len(self.granted)

    @property
    def claimable(self) -> int:
        """Segments a claim can have now: free ones and the reserve (not runs still being zeroed)."""
        return sum(m.free for m in self.maps.values()) + len(self.reserve)

    def mark_used(self, segments: Iterable[Segment]) -> None:
        for container_id, pseg in segments:
            segment_map = self.maps[container_id]
            if segment_map.state[pseg] != LABEL:
                segment_map.set(pseg, USED)

    def release(self, segments: Iterable[Segment]) -> None:
        for container_id, pseg in segments:
            segment_map = self.maps[container_id]
            if segment_map.state[pseg] != LABEL:
                segment_map.set(pseg, FREE)

    def claim_runs(self, count: int, state: int = USED) -> list[Run]:
        """Take count free segments as few long runs, marking them state; [] if fewer are claimable.

        The reserve goes back to free when a claim needs it; runs being zeroed for the reserve are never taken."""
        if sum(m.free for m in self.maps.values()) < count <= self.claimable:
            self.release(list(self.reserve))
            self.reserve.clear()
        if sum(m.free for m in self.maps.values()) < count:
            return []
        runs: list[Run] = []
        want = count
        while want:
            run = self._longest_run(want)
            container_id, first, length = run
            segment_map = self.maps[container_id]
            for pseg in range(first, first + length):
                segment_map.set(pseg, state)
            segment_map.cursor = first + length
            runs.append(run)
            want -= length
        return runs

    def _longest_run(self, want: int) -> Run:
        """A free run of want segments if any container has one (next fit), else the longest free run there is."""
        for segment_map in self.maps.values():
            if segment_map.free >= want:
                at = segment_map.find_run(want)
                if at >= 0:
                    return (segment_map.container_id, at, want)
        best: Run = (0, 0, 0)
        for segment_map in self.maps.values():
            at, length = segment_map.longest_run(want)
            if length > best[2]:
                best = (segment_map.container_id, at, length)
        return best

    def plan_reserve(self, target: int) -> list[Run]:
        """Runs of free segments to zero and then add_reserve(), bringing the reserve up to target.

        Never more than half of what is free (at least one): a refill in flight must not starve an allocation."""
        free = sum(m.free for m in self.maps.values())
        want = min(target - len(self.reserve), max(free // 2, min(free, 1)))
        if want <= 0:
            return []
        runs = self.claim_runs(want, RESERVED)
        self.in_flight.extend(runs)
        return runs

    def add_reserve(self, runs: Iterable[Run]) -> None:
        """Runs from plan_reserve() are zeroed: they join the reserve."""
        for run in runs:
            self.in_flight.remove(run)
            container_id, first, length = run
            self.reserve.update(((container_id, p), None) for p in range(first, first + length))

    def cancel_reserve(self, runs: Iterable[Run]) -> None:
        """Runs from plan_reserve() could not be zeroed: they go back to free."""
        for run in runs:
            self.in_flight.remove(run)
            container_id, first, length = run
            self.release((container_id, pseg) for pseg in range(first, first + length))

    def take(self, count: int, hint: Segment | None) -> list[Segment]:
        """Up to count reserved segments for consecutive vdisk segments: from hint on while it is reserved,
        else the front of the reserve, kept contiguous while the reserve allows."""
        if not self.reserve or count <= 0:
            return []
        start = hint if hint is not None and hint in self.reserve else next(iter(self.reserve))
        taken = [start]
        del self.reserve[start]
        while len(taken) < count and self.reserve:
            following = (taken[-1][0], taken[-1][1] + 1)
            if following in self.reserve:
                del self.reserve[following]
                taken.append(following)
            else:
                taken.append(self._pop_front())
        self.mark_used(taken)
        return taken

    def _pop_front(self) -> Segment:
        segment = next(iter(self.reserve))
        del self.reserve[segment]
        return segment
