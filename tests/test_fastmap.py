"""The Cython map table against the plain-Python reference model, plus its gate and memory use.

Hypothesis drives both tables with the same random commands and compares every translation."""

import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
import pyximport
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import san
from san._fastmap import (
    ERROR,
    INVALID,
    IO_KIND_NAMES,
    LATENCY_BOUNDS,
    NOWRITE,
    READ_IO,
    SHARED,
    UNMAP_IO,
    WRITE_IO,
    ZERO,
    MapFault,
    MapTable,
    bitmap_runs,
    runs_bitmap,
)
from san.agent.refmap import RefMapTable

BUILD = tempfile.TemporaryDirectory(prefix="san-cdef-")  # a fresh build: pyximport misses .pxd changes
pyximport.install(language_level=3, build_dir=BUILD.name)
sys.path.append(str(Path(san.__file__).parent.parent))
from _cdef_api import mark_written_cdef, translate_cdef  # noqa: E402  (compiled on import)

STATES = st.sampled_from([0, NOWRITE, ZERO, ERROR, INVALID, NOWRITE | ZERO, NOWRITE | SHARED])


class TableMachine(RuleBasedStateMachine):
    """Every rule applies to both tables; every translation must agree exactly."""

    @initialize(segment_blocks=st.sampled_from([1, 8, 64, 128, 256]), nsegments=st.integers(1, 6))
    def create(self, segment_blocks: int, nsegments: int) -> None:
        self.fast = MapTable(nsegments, segment_blocks, 512)
        self.ref = RefMapTable(nsegments, segment_blocks, 512)

    def both(self, name: str, *args: object) -> None:
        results: list[str | None] = []
        for table in (self.fast, self.ref):
            try:
                getattr(table, name)(*args)
                results.append(None)
            except ValueError:
                results.append("ValueError")
        assert results[0] == results[1], (name, args, results)

    @rule(data=st.data())
    def set_entries(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, self.ref.nsegments - 1))
        entries = data.draw(
            st.lists(st.tuples(st.integers(0, 5), st.integers(0, 40), STATES), max_size=self.ref.nsegments - start)
        )
        self.both("set_entries", start, entries)

    @rule(data=st.data())
    def fill_invalid(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, self.ref.nsegments - 1))
        entries = data.draw(
            st.lists(st.tuples(st.integers(0, 5), st.integers(0, 40), STATES), max_size=self.ref.nsegments - start)
        )
        self.both("fill_invalid", start, entries)

    @rule(data=st.data(), bits=st.sampled_from([NOWRITE, ZERO, ERROR, INVALID, SHARED, NOWRITE | SHARED, 0, 32]))
    def set_state(self, data: st.DataObject, bits: int) -> None:
        start = data.draw(st.integers(0, self.ref.nsegments))
        count = data.draw(st.integers(0, self.ref.nsegments + 1 - start))
        self.both("set_state", start, count, bits)

    @rule(data=st.data(), bits=st.sampled_from([NOWRITE, ZERO, SHARED, NOWRITE | SHARED, 0]))
    def clear_state(self, data: st.DataObject, bits: int) -> None:
        start = data.draw(st.integers(0, self.ref.nsegments))
        count = data.draw(st.integers(0, self.ref.nsegments - start))
        self.both("clear_state", start, count, bits)

    @rule(data=st.data(), writable=st.booleans())
    def set_alternate(self, data: st.DataObject, writable: bool) -> None:
        segment = data.draw(st.integers(0, self.ref.nsegments - 1))
        nbytes = (self.ref.segment_blocks + 7) // 8
        bitmap = data.draw(st.none() | st.binary(min_size=0, max_size=nbytes))
        location = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 40))
        self.both("set_alternate", segment, *location, bitmap, writable)

    @rule(data=st.data(), from_c=st.booleans())
    def mark_written(self, data: st.DataObject, from_c: bool) -> None:
        total = self.ref.nsegments * self.ref.segment_blocks
        lba = data.draw(st.integers(0, total - 1))
        nblocks = data.draw(st.integers(0, total - lba))
        if from_c:
            mark_written_cdef(self.fast, lba, nblocks)
            self.ref.mark_written(lba, nblocks)
        else:
            self.both("mark_written", lba, nblocks)

    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, self.ref.nsegments))
        self.both("share", start, data.draw(st.integers(0, self.ref.nsegments + 1 - start)))

    @rule(data=st.data())
    def freeze_and_thaw(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, self.ref.nsegments))
        count = data.draw(st.integers(0, self.ref.nsegments - start))
        frozen = self.fast.freeze_alternates(start, count)
        assert frozen == self.ref.freeze_alternates(start, count)
        if data.draw(st.booleans()):
            self.fast.thaw(frozen)
            self.ref.thaw(frozen)

    @rule()
    def take_dirty(self) -> None:
        assert self.fast.take_dirty() == self.ref.take_dirty()

    @rule(data=st.data())
    def mark_dirty(self, data: st.DataObject) -> None:
        self.both("mark_dirty", data.draw(st.integers(0, self.ref.nsegments - 1)))

    @rule(data=st.data(), in_alt=st.booleans())
    def mark_alternate(self, data: st.DataObject, in_alt: bool) -> None:
        segment = data.draw(st.integers(0, self.ref.nsegments - 1))
        first = data.draw(st.integers(0, self.ref.segment_blocks - 1))
        count = data.draw(st.integers(0, self.ref.segment_blocks - first + 1))
        self.both("mark_alternate", segment, first, count, in_alt)

    @rule(data=st.data())
    def clear_alternate(self, data: st.DataObject) -> None:
        self.both("clear_alternate", data.draw(st.integers(0, self.ref.nsegments - 1)))

    @precondition(lambda self: self.ref.nsegments < 12)
    @rule(extra=st.integers(0, 3))
    def grow(self, extra: int) -> None:
        self.both("grow", self.ref.nsegments + extra)

    @rule(data=st.data(), is_write=st.booleans())
    def translate(self, data: st.DataObject, is_write: bool) -> None:
        total = self.ref.nsegments * self.ref.segment_blocks
        lba = data.draw(st.integers(0, total - 1))
        nblocks = data.draw(st.integers(1, total - lba))
        expected = self.ref.translate(lba, nblocks, is_write)
        assert self.fast.translate(lba, nblocks, is_write) == expected
        from_c = translate_cdef(self.fast, lba, nblocks, is_write)
        if from_c is not None:  # None: more extents than the C caller's buffer, which it must then grow
            assert from_c == expected

    @invariant()
    def same_entries(self) -> None:
        assert self.fast.get_entries(0, self.fast.nsegments) == self.ref.get_entries(0, self.ref.nsegments)
        assert self.fast.dirty == self.ref.dirty


TestTableMachine = TableMachine.TestCase
TestTableMachine.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@given(st.binary(max_size=40), st.integers(0, 330))
def test_a_bitmap_is_its_runs_of_set_bits(bitmap: bytes, nbits: int) -> None:
    runs = bitmap_runs(bitmap, nbits)
    expected = [b for b in range(min(nbits, len(bitmap) * 8)) if bitmap[b // 8] >> (b % 8) & 1]
    assert [b for first, count in runs for b in range(first, first + count)] == expected
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(runs)), "runs are sorted, apart and maximal"
    assert bitmap_runs(runs_bitmap(runs, nbits), nbits) == runs
    assert runs_bitmap([], nbits, runs_bitmap(runs, nbits)) == runs_bitmap(runs, nbits)
    with pytest.raises(ValueError):
        runs_bitmap([(nbits, 1)], nbits)


def test_new_table_is_invalid_everywhere() -> None:
    table = MapTable(3, 2048)
    assert table.translate(0, 1) == MapFault(0, INVALID)
    assert table.translate(3 * 2048 - 1, 1, True) == MapFault(2, INVALID)


def test_invalidate_all_forgets_every_entry_and_its_memory() -> None:
    table = MapTable(5000, 2048)
    empty = table.memory_bytes
    table.set_entries(0, [(1, 5, 0)] * 3000)
    table.set_alternate(10, 1, 99)
    full = table.memory_bytes
    table.invalidate_all()
    assert table.memory_bytes < full and table.memory_bytes - empty < 1024, "the pages went; one alternate slot stays"
    assert table.get_entries(0, 1) == [(0, 0, INVALID, None)] and table.get_entries(10, 1) == [(0, 0, INVALID, None)]
    assert isinstance(table.translate(0, 1), MapFault)
    table.set_alternate(10, 1, 98)  # the alternate slots freed are reused
    assert table.get_entries(10, 1)[0][3] is not None


def test_out_of_range_requests_are_refused() -> None:
    table = MapTable(2, 8)
    table.set_entries(0, [(1, 0, 0), (1, 1, 0)])
    for lba, n in [(16, 1), (15, 2), (0, 0), (2**64 - 1, 1)]:
        with pytest.raises(ValueError):
            table.translate(lba, n)
    with pytest.raises(ValueError):
        table.set_entries(1, [(1, 0, 0), (1, 1, 0)])
    with pytest.raises(ValueError):
        table.set_entries(0, [(1, 0, 0), (70000, 1, 0)])
    assert table.translate(0, 16) == [(1, 0, 16 * 512)]


def test_a_bad_entry_changes_nothing() -> None:
    table = MapTable(2, 8)
    table.set_entries(0, [(1, 4, 0), (1, 5, 0)])
    with pytest.raises(ValueError):
        table.set_entries(0, [(2, 0, 0), (1, 1, 99)])
    assert table.get_entries(0, 2) == [(1, 4, 0, None), (1, 5, 0, None)]


def test_one_gib_segments_and_4k_blocks() -> None:
    table = MapTable(4, (1 << 30) // 4096, 4096)
    table.set_entries(0, [(7, 3, 0), (7, 4, 0), (7, 9, 0), (1, 0, ZERO)])
    blocks = (1 << 30) // 4096
    assert table.translate(blocks - 1, 3) == [(7, 3 * (1 << 30) + (blocks - 1) * 4096, 3 * 4096)]
    assert table.translate(2 * blocks - 1, 2) == [(7, 5 * (1 << 30) - 4096, 4096), (7, 9 << 30, 4096)]
    assert table.translate(3 * blocks, blocks) == [(-1, 0, 1 << 30)]


def test_barrier_waits_for_io_begun_before_it_only() -> None:
    table = MapTable(1, 8)
    fired: list[str] = []
    first = table.io_start()
    table.barrier(lambda: fired.append("a"))
    later = table.io_start()
    table.barrier(lambda: fired.append("b"))
    assert fired == []
    table.io_end(first)
    assert fired == ["a"]
    table.io_end(later)
    assert fired == ["a", "b"]
    table.barrier(lambda: fired.append("c"))
    assert fired == ["a", "b", "c"]
    with pytest.raises(ValueError):
        table.io_end(later)


def test_barrier_ignores_io_started_after_it() -> None:
    table = MapTable(1, 8)
    fired: list[str] = []
    old = table.io_start()
    table.barrier(lambda: fired.append("x"))
    new = table.io_start()
    table.io_end(old)
    assert fired == ["x"]
    assert table.inflight == 1
    table.io_end(new)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_per_entry_is_at_most_16_bytes() -> None:
    nsegments = 16 << 20
    before = _rss_bytes()
    table = MapTable(nsegments, 2048)
    table.set_state(0, nsegments, ZERO)
    grown = _rss_bytes() - before
    assert grown / nsegments <= 16, f"{grown / nsegments:.1f} bytes per entry"
    del table


def test_a_barrier_registered_by_a_firing_callback_fires_too() -> None:
    table = MapTable(1, 8)
    fired: list[str] = []
    first = table.io_start()

    def x() -> None:
        fired.append("x")
        table.barrier(lambda: fired.append("y"))

    table.barrier(x)
    table.barrier(lambda: fired.append("z"))
    table.io_end(first)
    assert fired == ["x", "z", "y"]


def test_tables_past_the_entry_limit_are_refused() -> None:
    with pytest.raises(ValueError):
        MapTable(0x1555555555555556, 1)


def test_io_statistics_count_commands_bytes_errors_and_latency_buckets() -> None:
    table = MapTable(4, 2048)
    now = time.monotonic_ns()
    table.account(READ_IO, 4096, now - 30_000)  # 30 us ago: the 25-50 us bucket
    table.account(READ_IO, 8192, now - 2_000_000_000)  # 2 s ago: the 1-2.5 s bucket
    table.account(UNMAP_IO, 1 << 20, now)
    table.account_error(WRITE_IO)
    reads, writes, unmaps, flushes = table.io_stats()
    assert (reads.commands, reads.bytes, reads.errors) == (2, 12288, 0)
    assert reads.buckets[LATENCY_BOUNDS.index(5e-05)] == 1 and reads.buckets[LATENCY_BOUNDS.index(2.5)] == 1
    assert sum(reads.buckets) == 2 and 2.0 < reads.latency_seconds < 3.0
    assert (writes.commands, writes.errors, sum(writes.buckets)) == (0, 1, 0)
    assert (unmaps.commands, unmaps.bytes) == (1, 1 << 20)
    assert flushes == (0, 0, 0, 0.0, (0,) * (len(LATENCY_BOUNDS) + 1))
    assert IO_KIND_NAMES == ("read", "write", "unmap", "flush")
    with pytest.raises(ValueError):
        table.account(7, 0, now)
