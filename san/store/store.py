"""The interface of the persistent tables: pools, containers, vdisks, mappings, segment counts, hosts and zones.

Writes happen only inside a transaction that the metadata object (metadata.py) begins and commits or rolls back."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple, Protocol

from san.model import Container, Host, Pool, VDisk, Zone

SCHEMA_VERSION = 4


class Mapping(NamedTuple):
    """A persistent map-table entry: vdisk segment -> (container, physical segment) with state bits, and maybe an
    alternate location (alt_container, alt_pseg) whose bitmap says which blocks live there (None: no alternate).
    birth: the generation of the vdisk it was written in; pbirth: the one its primary location came in."""

    vseg: int
    container_id: int
    pseg: int
    state: int
    alt_container: int = 0
    alt_pseg: int = 0
    bitmap: bytes | None = None
    birth: int = 0
    pbirth: int = 0


class StoreError(Exception):
    """The store cannot be opened or used (missing, newer schema, damaged)."""


class Store(Protocol):
    """Persistent tables behind one small interface; SQLite now, PostgreSQL for a standby controller later."""

    store_id: str
    in_transaction: bool

    def begin(self) -> None: ...

    def commit(self) -> None:
        """Make every change of the open transaction durable, atomically."""

    def rollback(self) -> None: ...

    def close(self) -> None: ...

    def add_pool(self, name: str, segment_size: int, warn_percent: int, allocate_ahead: int) -> Pool: ...

    def pools(self) -> list[Pool]: ...

    def delete_pool(self, pool_id: int) -> None: ...

    def add_container(self, container: Container) -> Container: ...

    def next_container_id(self) -> int: ...

    def update_container(self, container: Container) -> None: ...

    def containers(self, pool_id: int | None = None) -> list[Container]: ...

    def add_vdisk(self, name: str, pool_id: int, size_bytes: int, block_size: int, thin: bool, state: str) -> VDisk: ...

    def vdisks(self) -> list[VDisk]: ...

    def update_vdisk(self, vdisk: VDisk) -> None: ...

    def delete_vdisk(self, vdisk_id: int) -> None: ...

    def mappings(self, vdisk_id: int, start: int, stop: int) -> list[Mapping]:
        """Mappings of vdisk segments [start, stop), in segment order."""

    def set_mapping_state(self, vdisk_id: int, start: int, stop: int, state: int) -> None:
        """Set the state bits of the mapped segments in [start, stop)."""

    def count_mappings(self, vdisk_id: int) -> int:
        """How many segments of the vdisk are mapped."""

    def add_mappings(self, vdisk_id: int, mappings: Iterable[Mapping]) -> None:
        """Map unmapped vdisk segments and take a reference on each physical segment."""

    def remove_mappings(self, vdisk_id: int, start: int, stop: int) -> list[tuple[int, int]]:
        """Unmap vdisk segments [start, stop); return the physical segments whose last reference went."""

    def remove_mapping_ranges(
        self, vdisk_id: int, ranges: Iterable[tuple[int, int]], collect: bool = True
    ) -> list[tuple[int, int]]: ...

    def unreferenced(self) -> list[tuple[int, int]]:
        """The physical segments no mapping holds any more (after remove_mapping_ranges without collect)."""

    def used_segments(self) -> Iterator[tuple[int, int]]:
        """Every referenced (container id, physical segment)."""

    def segment_used(self, container_id: int, pseg: int) -> bool: ...

    def segment_counts(self) -> dict[int, int]:
        """Referenced segments per container id."""

    def add_host(self, name: str, iqn: str, chap: tuple[str, str, str, str]) -> Host: ...

    def hosts(self) -> list[Host]: ...

    def delete_host(self, host_id: int) -> None: ...

    def update_host(self, host: Host) -> None:
        """Its iSCSI name and CHAP credentials become host's (by id)."""

    def update_zone(self, zone: Zone) -> None:
        """The zone of (host_id, vdisk_id) gets zone's LUN and read-only flag."""

    def rename_vdisk(self, vdisk_id: int, name: str) -> None: ...

    def add_zone(self, zone: Zone) -> None: ...

    def zones(self) -> list[Zone]: ...

    def delete_zone(self, host_id: int, vdisk_id: int) -> None: ...
