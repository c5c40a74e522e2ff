"""A plain-Python reference model of the Cython map table, written for clarity rather than speed.

Property tests drive it and san._fastmap.MapTable with the same commands; bench/fastmap.py times both."""

from __future__ import annotations

from dataclasses import dataclass, field

from san._fastmap import ALL_STATES, ERROR, INVALID, MAX_CONTAINER, MAX_SEGMENT, NOWRITE, SHARED, ZERO, MapFault

Extent = tuple[int, int, int]


@dataclass
class RefEntry:
    """One segment's mapping: primary location, state bits, optional alternate location with block set (writable:
    it takes every write; dirty: bits set since they were last taken)."""

    container: int = 0
    segment: int = 0
    state: int = INVALID
    alternate: tuple[int, int] | None = None
    alt_blocks: set[int] = field(default_factory=set)
    writable: bool = False
    dirty: bool = False
    frozen: bool = False


class RefMapTable:
    """Same behaviour as MapTable: translate() block by block, then merge neighbouring extents."""

    def __init__(self, nsegments: int, segment_blocks: int, block_size: int = 512) -> None:
        if segment_blocks <= 0 or segment_blocks & (segment_blocks - 1):
            raise ValueError("segment_blocks must be a power of two")
        self.segment_blocks = segment_blocks
        self.block_size = block_size
        self.entries: list[RefEntry] = []
        self.grow(nsegments)

    @property
    def nsegments(self) -> int:
        return len(self.entries)

    def grow(self, nsegments: int) -> None:
        if nsegments < len(self.entries):
            raise ValueError("a map table cannot shrink")
        self.entries.extend(RefEntry() for _ in range(nsegments - len(self.entries)))

    def translate(self, lba: int, nblocks: int, is_write: bool = False) -> list[Extent] | MapFault:
        if nblocks <= 0 or lba < 0 or lba + nblocks > len(self.entries) * self.segment_blocks:
            raise ValueError("request outside the table")
        extents: list[Extent] = []
        block, end = lba, lba + nblocks
        while block < end:
            seg, offset = divmod(block, self.segment_blocks)
            count = min(self.segment_blocks - offset, end - block)
            entry = self.entries[seg]
            if entry.state & (INVALID | ERROR) or (is_write and entry.state & SHARED and not entry.writable):
                return MapFault(seg, entry.state)
            runs = [(offset, count, True)] if is_write and entry.writable else self._runs(entry, offset, count)
            for first, run, in_alt in runs:
                if in_alt:
                    assert entry.alternate is not None
                    container, segment = entry.alternate
                elif is_write and entry.state & (NOWRITE | ZERO):
                    return MapFault(seg, entry.state)
                elif entry.state & ZERO:
                    self._append(extents, (-1, 0, run * self.block_size))
                    continue
                else:
                    container, segment = entry.container, entry.segment
                byte = (segment * self.segment_blocks + first) * self.block_size
                self._append(extents, (container, byte, run * self.block_size))
            block += count
        return extents

    @staticmethod
    def _runs(entry: RefEntry, offset: int, count: int) -> list[tuple[int, int, bool]]:
        """Split blocks [offset, offset+count) of a segment into runs of (first, length, in alternate)."""
        if entry.alternate is None:
            return [(offset, count, False)]
        runs: list[tuple[int, int, bool]] = []
        for block in range(offset, offset + count):
            in_alt = block in entry.alt_blocks
            if runs and runs[-1][2] == in_alt:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1, in_alt)
            else:
                runs.append((block, 1, in_alt))
        return runs

    @staticmethod
    def _append(extents: list[Extent], piece: Extent) -> None:
        if extents:
            container, offset, length = extents[-1]
            if container == piece[0] and (container < 0 or offset + length == piece[1]):
                extents[-1] = (container, offset, length + piece[2])
                return
        extents.append(piece)

    def get_entries(self, start: int, count: int) -> list[tuple[int, int, int, tuple[int, int, bytes, bool] | None]]:
        self._check_range(start, count)
        result: list[tuple[int, int, int, tuple[int, int, bytes, bool] | None]] = []
        for entry in self.entries[start : start + count]:
            alternate = None
            if entry.alternate is not None:
                bitmap = bytearray((self.segment_blocks + 7) // 8)
                for block in entry.alt_blocks:
                    bitmap[block // 8] |= 1 << (block % 8)
                alternate = (*entry.alternate, bytes(bitmap), entry.writable)
            result.append((entry.container, entry.segment, entry.state, alternate))
        return result

    def set_entries(self, start: int, entries: list[tuple[int, int, int]]) -> None:
        self._check_range(start, len(entries))
        for container, segment, state in entries:
            if not 0 <= container <= MAX_CONTAINER or not 0 <= segment <= MAX_SEGMENT or state & ~ALL_STATES:
                raise ValueError("bad entry")
        for index, (container, segment, state) in enumerate(entries, start):
            self.entries[index] = RefEntry(container, segment, state)

    def fill_invalid(self, start: int, entries: list[tuple[int, int, int]]) -> None:
        self._check_range(start, len(entries))
        for container, segment, state in entries:
            if not 0 <= container <= MAX_CONTAINER or not 0 <= segment <= MAX_SEGMENT or state & ~ALL_STATES:
                raise ValueError("bad entry")
        for index, (container, segment, state) in enumerate(entries, start):
            if self.entries[index].state & INVALID:
                self.entries[index] = RefEntry(container, segment, state)

    def set_state(self, start: int, count: int, bits: int) -> None:
        if not bits or bits & ~ALL_STATES:
            raise ValueError("bad state bits")
        self._check_range(start, count)
        for entry in self.entries[start : start + count]:
            entry.state |= bits

    def share(self, start: int, count: int) -> None:
        self._check_range(start, count)
        for entry in self.entries[start : start + count]:
            if not (entry.state & NOWRITE and not entry.state & SHARED):
                entry.state |= NOWRITE | SHARED

    def clear_state(self, start: int, count: int, bits: int) -> None:
        if not bits or bits & ~(NOWRITE | SHARED):
            raise ValueError("only NOWRITE and SHARED can be cleared")
        self._check_range(start, count)
        for entry in self.entries[start : start + count]:
            entry.state &= ~bits

    def set_alternate(
        self, segment: int, container: int, alt_segment: int, bitmap: bytes | None = None, writable: bool = False
    ) -> None:
        self._check_range(segment, 1)
        if container > MAX_CONTAINER or alt_segment > MAX_SEGMENT:
            raise ValueError("bad alternate location")
        if bitmap is not None and len(bitmap) > (self.segment_blocks + 7) // 8:
            raise ValueError("bitmap too long")
        entry = self.entries[segment]
        entry.alternate = (container, alt_segment)
        entry.writable, entry.dirty, entry.frozen = writable, False, False
        entry.alt_blocks = {
            block
            for block in range(self.segment_blocks)
            if bitmap is not None and block // 8 < len(bitmap) and bitmap[block // 8] >> (block % 8) & 1
        }

    def mark_alternate(self, segment: int, first_block: int, nblocks: int, in_alt: bool = True) -> None:
        self._check_range(segment, 1)
        entry = self.entries[segment]
        if entry.alternate is None:
            raise ValueError("no alternate location")
        if first_block + nblocks > self.segment_blocks:
            raise ValueError("blocks outside the segment")
        blocks = set(range(first_block, first_block + nblocks))
        entry.alt_blocks = entry.alt_blocks | blocks if in_alt else entry.alt_blocks - blocks

    def clear_alternate(self, segment: int) -> None:
        self._check_range(segment, 1)
        entry = self.entries[segment]
        entry.alternate, entry.alt_blocks, entry.writable, entry.dirty, entry.frozen = None, set(), False, False, False

    def freeze_alternates(self, start: int, count: int) -> list[int]:
        self._check_range(start, count)
        frozen = []
        for index in range(start, start + count):
            entry = self.entries[index]
            if entry.writable:
                entry.writable, entry.frozen = False, True
                frozen.append(index)
        return frozen

    def thaw(self, segments: list[int]) -> None:
        for segment in segments:
            self._check_range(segment, 1)
            self.entries[segment].frozen = False

    def mark_written(self, lba: int, nblocks: int) -> None:
        if lba < 0 or nblocks < 0 or lba + nblocks > len(self.entries) * self.segment_blocks:
            raise ValueError("blocks outside the table")
        for block in range(lba, lba + nblocks):
            entry = self.entries[block // self.segment_blocks]
            if (entry.writable or entry.frozen) and block % self.segment_blocks not in entry.alt_blocks:
                entry.alt_blocks.add(block % self.segment_blocks)
                entry.dirty = True

    def take_dirty(self) -> list[tuple[int, int, int, bytes]]:
        found = []
        for index, entry in enumerate(self.entries):
            if entry.dirty:
                entry.dirty = False
                alternate = self.get_entries(index, 1)[0][3]
                assert alternate is not None
                found.append((index, *alternate[:3]))
        return found

    def mark_dirty(self, segment: int) -> None:
        self._check_range(segment, 1)
        entry = self.entries[segment]
        entry.dirty = entry.alternate is not None

    @property
    def dirty(self) -> int:
        return sum(entry.dirty for entry in self.entries)

    def _check_range(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > len(self.entries):
            raise ValueError("entries outside the table")
