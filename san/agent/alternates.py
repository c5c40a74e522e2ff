"""Copy on write in the agent: alternate locations as the controller sends them, and as the agent reports them.

An entry shared with a snapshot gets a writable alternate location; the blocks written land there and are reported."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from san._fastmap import MapTable, bitmap_runs, runs_bitmap
from san.protocol.messages import MAX_ITEMS, Alternate
from san.storage.containers import ContainerSet


def install(table: MapTable, alternates: Iterable[Alternate], only: set[int] | None = None) -> None:
    """Give entries the alternate locations an answer or a command names (all their blocks), each only where
    `only` (if given) includes its entry. ValueError for an entry or a block outside the table."""
    for alt in alternates:
        if only is None or alt.vseg in only:
            table.set_alternate(alt.vseg, alt.container, alt.segment, _bitmap(table, alt), alt.writable)


def mark(table: MapTable, alternates: Iterable[Alternate]) -> None:
    """Add blocks to entries' alternate locations (another agent wrote them); an entry with no alternate location
    there gets it, with just these blocks."""
    for alt in alternates:
        current = table.get_entries(alt.vseg, 1)[0][3]
        if current is None or current[:2] != (alt.container, alt.segment):
            table.set_alternate(alt.vseg, alt.container, alt.segment, _bitmap(table, alt), alt.writable)
            continue
        for first, count in alt.runs:
            table.mark_alternate(alt.vseg, first, count)


def _bitmap(table: MapTable, alt: Alternate) -> bytes:
    if not 0 <= alt.vseg < table.nsegments:
        raise ValueError(f"entry {alt.vseg} is outside the table ({table.nsegments} entries)")
    return runs_bitmap(alt.runs, table.segment_blocks)


def take_reports(table: MapTable) -> list[tuple[Alternate, ...]]:
    """The dirty alternate locations as reports, each at most MAX_ITEMS runs (a location whose bitmap has more goes
    in several: the controller adds them up). The table's are clean afterwards: put_back() if a report fails."""
    batches: list[tuple[Alternate, ...]] = []
    batch: list[Alternate] = []
    room = MAX_ITEMS
    for vseg, container, segment, bitmap in table.take_dirty():
        runs = bitmap_runs(bitmap, table.segment_blocks)
        for part in _parts(runs) if runs else [()]:
            if len(batch) == MAX_ITEMS or (batch and len(part) > room):
                batches.append(tuple(batch))
                batch, room = [], MAX_ITEMS
            batch.append(Alternate(vseg, container, segment, part))
            room -= len(part)
    if batch:
        batches.append(tuple(batch))
    return batches


def _parts(runs: list[tuple[int, int]]) -> Iterator[tuple[tuple[int, int], ...]]:
    for at in range(0, len(runs), MAX_ITEMS):
        yield tuple(runs[at : at + MAX_ITEMS])


def put_back(table: MapTable, reports: Iterable[tuple[Alternate, ...]]) -> None:
    """Reports that did not reach the controller: their entries are dirty again (reported whole next time)."""
    for report in reports:
        for alt in report:
            if alt.vseg < table.nsegments:
                table.mark_dirty(alt.vseg)


def copy_blocks(
    containers: ContainerSet, table: MapTable, source: tuple[int, int], target: tuple[int, int], bitmap: bytes
) -> int:
    """Copy the blocks set in bitmap from segment `source` to segment `target` ((container, segment) each): what a
    shared alternate location holds, into the fresh one that replaces it. The bytes copied. Blocking I/O: call it in
    a thread."""
    block_size = table.block_size
    segment_bytes = table.segment_bytes
    copied = 0
    for first, count in bitmap_runs(bitmap, table.segment_blocks):
        buffer = bytearray(count * block_size)
        containers.read_into(source[0], source[1] * segment_bytes + first * block_size, memoryview(buffer))
        containers.write_from(target[0], target[1] * segment_bytes + first * block_size, memoryview(buffer))
        copied += len(buffer)
    return copied
