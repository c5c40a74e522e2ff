"""Type stub for the Cython map table (san/_fastmap.pyx).

See the .pyx for behaviour; this file only tells mypy the Python-visible API."""

from collections.abc import Callable, Sequence
from typing import NamedTuple

INVALID: int
NOWRITE: int
ZERO: int
ERROR: int
ALL_STATES: int
ZEROS: int
MAX_CONTAINER: int
MAX_SEGMENT: int
MAX_ENTRIES: int
IO_KIND_NAMES: tuple[str, ...]
READ_IO: int
WRITE_IO: int
UNMAP_IO: int
FLUSH_IO: int
LATENCY_BOUNDS: tuple[float, ...]

class IOStat(NamedTuple):
    commands: int
    bytes: int
    errors: int
    latency_seconds: float
    buckets: tuple[int, ...]

class MapFault(NamedTuple):
    segment: int
    state: int

Extent = tuple[int, int, int]
Alternate = tuple[int, int, bytes]

class MapTable:
    nsegments: int
    block_size: int
    segment_blocks: int
    segment_bytes: int
    nblocks: int
    inflight: int
    memory_bytes: int
    def __init__(self, nsegments: int, segment_blocks: int, block_size: int = 512) -> None: ...
    def grow(self, nsegments: int) -> None: ...
    def translate(self, lba: int, nblocks: int, is_write: bool = False) -> list[Extent] | MapFault: ...
    def get_entries(self, start: int, count: int) -> list[tuple[int, int, int, Alternate | None]]: ...
    def set_entries(self, start: int, entries: Sequence[tuple[int, int, int]]) -> None: ...
    def fill_invalid(self, start: int, entries: Sequence[tuple[int, int, int]]) -> None: ...
    def invalidate_all(self) -> None: ...
    def set_state(self, start: int, count: int, bits: int) -> None: ...
    def clear_state(self, start: int, count: int, bits: int) -> None: ...
    def set_alternate(self, segment: int, container: int, alt_segment: int, bitmap: bytes | None = None) -> None: ...
    def mark_alternate(self, segment: int, first_block: int, nblocks: int, in_alt: bool = True) -> None: ...
    def clear_alternate(self, segment: int) -> None: ...
    def account(self, kind: int, nbytes: int, arrived_ns: int) -> None: ...
    def account_reply(self, opcode: int, status: int, sent: int, moved: int, unmapped: bool, arrived_ns: int) -> None: ...
    def account_error(self, kind: int) -> None: ...
    def io_stats(self) -> list[IOStat]: ...
    def io_start(self) -> int: ...
    def io_end(self, slot: int) -> None: ...
    def barrier(self, callback: Callable[[], object]) -> None: ...
