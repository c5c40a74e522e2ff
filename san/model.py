"""The objects an administrator names (Pool, Container, VDisk, Host, Zone), shared by store, controller, API and CLI.

Plain dataclasses: the same names and fields appear in the database, the JSON of the API and the CLI's tables."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from san.errors import InvalidRequest

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
MIN_SEGMENT_SIZE = 64 * KIB
MAX_SEGMENT_SIZE = 1 * GIB
DEFAULT_SEGMENT_SIZE = 1 * MIB
BLOCK_SIZES = (512, 4096)
DEFAULT_BLOCK_SIZE = 512
DEFAULT_WARN_PERCENT = 80
DEFAULT_ALLOCATE_AHEAD = 4
MAX_CONTAINERS = 0xFFFE
LABEL_SEGMENTS = 1  # the first segment of every container holds its label
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def printable(value: object) -> str:
    """str(value) with control characters (ESC, NUL, newlines...) escaped, safe for a terminal or a log line."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def shown(text: str, limit: int = 64) -> str:
    """A name or value as an error message quotes it: repr, cut short when it is long."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def check_name(kind: str, name: str) -> None:
    """Names of pools, vdisks and hosts: 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not NAME.fullmatch(name):
        raise InvalidRequest(
            f"invalid {kind} name {shown(name)}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


@dataclass
class Pool:
    """A set of containers that vdisks draw segments from; all its segments have one size."""

    id: int
    name: str
    segment_size: int
    warn_percent: int = DEFAULT_WARN_PERCENT
    allocate_ahead: int = DEFAULT_ALLOCATE_AHEAD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Container:
    """One physical store of a pool: a sparse file san created, or an existing file or block device.

    Its first segment holds its label (uuid, store id, epoch: san/storage/label.py); the rest hold vdisk data. A
    path inside the data directory is kept relative to it, so a copied data directory uses its own copies."""

    id: int
    pool_id: int
    path: str
    kind: str
    size_bytes: int
    nsegments: int
    owned: bool
    uuid: str = ""
    epoch: str = ""
    epoch_next: str = ""

    @property
    def data_segments(self) -> int:
        """Segments that can hold vdisk data (all but the label's)."""
        return max(self.nsegments - LABEL_SEGMENTS, 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public(self) -> dict[str, Any]:
        """What the API shows."""
        return {k: v for k, v in asdict(self).items() if k not in ("epoch", "epoch_next")}


@dataclass
class VDisk:
    """A virtual disk: its size, block size, provisioning, and whether its thick allocation is still running. A
    snapshot is one too, read-only, named VDISK@NAME: origin is the id of the vdisk it is of, generation the one of
    the origin it sees (a vdisk's own generation is the one its writes go into now), created when it was taken."""

    id: int
    name: str
    pool_id: int
    size_bytes: int
    block_size: int
    thin: bool
    serial: str
    state: str = "ready"
    origin: int = 0
    generation: int = 0
    created: str = ""

    def nsegments(self, segment_size: int) -> int:
        return -(-self.size_bytes // segment_size)

    @property
    def nblocks(self) -> int:
        return self.size_bytes // self.block_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Host:
    """An initiator, by its iSCSI name, with the CHAP credentials it must prove (and mutual ones the target proves)."""

    id: int
    name: str
    iqn: str
    chap_user: str = ""
    chap_secret: str = ""
    mutual_user: str = ""
    mutual_secret: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The public view: secrets are never shown."""
        return {"id": self.id, "name": self.name, "iqn": self.iqn, "chap_user": self.chap_user, "mutual_user": self.mutual_user}


@dataclass
class Zone:
    """A vdisk a host sees, at a LUN number, read-write or read-only."""

    host_id: int
    vdisk_id: int
    lun: int
    read_only: bool = False


def host_by_iqn(hosts: Iterable[Host], iqn: str) -> Host | None:
    """The host with that iSCSI name, if there is one."""
    return next((host for host in hosts if host.iqn == iqn), None)
