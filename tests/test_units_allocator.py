"""Size parsing, and the allocator's placement rules: contiguous runs, neighbour hints, the reserve.

Pure data-structure tests: no files, no store."""

import pytest

from san.controller.allocator import FREE, RESERVED, USED, PoolAllocator
from san.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("1K", 1024), ("10G", 10 << 30), ("1.5T", 3 << 39), ("512MiB", 512 << 20), ("2gb", 2 << 30)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12Q", "", "G", "-1G", "1.0000000001K", "1 2G", "0x10"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(10 << 30) == "10.00G"
    assert format_size(300) == "300B"


def test_claims_prefer_one_long_run() -> None:
    allocator = PoolAllocator([(1, 100)], label=0)
    allocator.mark_used([(1, 10), (1, 50)])
    assert allocator.claim_runs(30) == [(1, 11, 30)]
    assert allocator.used == 32
    assert allocator.claim_runs(1000) == []


def test_claims_split_when_no_run_is_long_enough() -> None:
    allocator = PoolAllocator([(1, 10), (2, 10)], label=0)
    allocator.mark_used([(1, 5), (2, 5)])
    runs = allocator.claim_runs(12)
    assert sum(length for _, _, length in runs) == 12
    assert runs == [(1, 0, 5), (2, 0, 5), (1, 6, 2)], "the longest runs first, as few as possible"
    assert allocator.free == 6


def test_take_follows_the_hint_then_stays_contiguous() -> None:
    allocator = PoolAllocator([(1, 64)], label=0)
    runs = allocator.plan_reserve(16)
    assert allocator.free == 64 and allocator.in_flight == runs
    allocator.add_reserve(runs)
    assert allocator.take(1, None) == [(1, 0)]
    assert allocator.take(3, (1, 8)) == [(1, 8), (1, 9), (1, 10)]
    assert allocator.take(2, (1, 40)) == [(1, 1), (1, 2)]
    assert allocator.maps[1].state[8] == USED and allocator.maps[1].state[3] == RESERVED
    allocator.release([(1, 8)])
    assert allocator.maps[1].state[8] == FREE


def test_a_thick_claim_may_take_the_reserve_back_but_not_runs_being_zeroed() -> None:
    allocator = PoolAllocator([(1, 8)], label=0)
    allocator.add_reserve(allocator.plan_reserve(4))
    in_flight = allocator.plan_reserve(8)
    assert in_flight == [(1, 4, 2)], "a refill sets aside at most half of what is free"
    assert allocator.free == 8 and allocator.claimable == 6
    assert allocator.claim_runs(7) == []
    assert allocator.claim_runs(6) == [(1, 0, 4), (1, 6, 2)]
    allocator.add_reserve(in_flight)
    assert list(allocator.reserve) == [(1, 4), (1, 5)]
    assert allocator.free == 2 and allocator.used == 6


def test_the_label_segment_is_never_handed_out() -> None:
    allocator = PoolAllocator([(1, 8), (2, 4)])
    assert allocator.capacity == 10 and allocator.free == 10
    runs = allocator.claim_runs(10)
    taken = {(c, p) for c, first, length in runs for p in range(first, first + length)}
    assert (1, 0) not in taken and (2, 0) not in taken and len(taken) == 10
    assert allocator.claim_runs(1) == []
    allocator.release([(1, 0), (2, 0)])
    assert allocator.free == 0, "releasing a label segment frees nothing"
