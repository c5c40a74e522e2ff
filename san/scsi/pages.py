"""INQUIRY data, the vital product data pages and the mode pages of a vdisk's logical unit.

Pure functions of the unit's properties, so the built-in target and the TCMU handler answer byte for byte alike."""

from __future__ import annotations

import struct
from dataclasses import dataclass

VENDOR = b"SAN     "
PRODUCT = b"VDISK           "
REVISION = b"0001"
# Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0460, 0x04C0)
VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)
MAX_TRANSFER_BLOCKS_BYTES = 8 << 20
MAX_UNMAP_DESCRIPTORS = 256
MAX_COMPARE_AND_WRITE_BLOCKS = 1
# Linux-IO's OUI, as LIO builds its NAA identifiers: the same vdisk shows the same WWN through both frontends.
NAA_PREFIX = "6001405"

PAGE_ERROR_RECOVERY = 0x01
PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_ALL = 0x3F
MODE_PAGES = (PAGE_ERROR_RECOVERY, PAGE_CACHING, PAGE_CONTROL)


@dataclass
class UnitInfo:
    """What the pages describe: one vdisk as a logical unit."""

    serial: str
    block_size: int
    nblocks: int
    thin: bool
    write_cache: bool = True
    # WRITE SAME(16) with NDOB carries no data-out, so LIO's write protection (which looks at the data direction)
    # does not stop it: with LIO, where san cannot tell which host sent a command, NDOB is refused.
    ndob: bool = True

    @property
    def naa(self) -> bytes:
        digits = (NAA_PREFIX + "".join(c for c in self.serial.lower() if c in "0123456789abcdef")).ljust(32, "0")[:32]
        return bytes.fromhex(digits)

    @property
    def max_transfer_blocks(self) -> int:
        return MAX_TRANSFER_BLOCKS_BYTES // self.block_size


def standard_inquiry() -> bytes:
    """Standard INQUIRY data: a direct-access block device, SPC-4, HiSup, command queuing."""
    head = struct.pack(">BBBBBBBB", 0x00, 0x00, 0x06, 0x12, 0, 0x00, 0x00, 0x02) + VENDOR + PRODUCT + REVISION
    body = head.ljust(58, b"\0") + b"".join(struct.pack(">H", v) for v in VERSION_DESCRIPTORS)
    body = body.ljust(96, b"\0")
    return body[:4] + bytes([len(body) - 5]) + body[5:]


def _vpd(page: int, body: bytes) -> bytes:
    return struct.pack(">BBH", 0x00, page, len(body)) + body


def vpd_page(page: int, unit: UnitInfo, port: tuple[str, int] | None = None) -> bytes | None:
    """The VPD page with this code, or None when it is not supported."""
    if page == 0x00:
        return _vpd(0x00, bytes(VPD_PAGES))
    if page == 0x80:
        return _vpd(0x80, unit.serial.encode())
    if page == 0x83:
        return _vpd(0x83, _designators(unit, port))
    if page == 0xB0:
        return _vpd(0xB0, _block_limits(unit))
    if page == 0xB1:
        return _vpd(0xB1, struct.pack(">HBB", 0x0001, 0, 0).ljust(0x3C, b"\0"))
    if page == 0xB2:
        lbp = 0xE0 | 0x04 if unit.thin else 0x00  # LBPU, LBPWS, LBPWS10; LBPRZ = 1
        return _vpd(0xB2, struct.pack(">BBBB", 0, lbp, 0x02 if unit.thin else 0x00, 0))
    return None


def _designator(code_set: int, association: int, kind: int, value: bytes, protocol: int | None = None) -> bytes:
    piv = 0x80 if protocol is not None else 0
    first = ((protocol or 0) << 4) | code_set
    return struct.pack(">BBBB", first, piv | (association << 4) | kind, 0, len(value)) + value


def _designators(unit: UnitInfo, port: tuple[str, int] | None) -> bytes:
    """The logical unit's NAA and T10 vendor identifiers; with a port, its relative port and the target's name."""
    out = _designator(1, 0, 3, unit.naa) + _designator(2, 0, 1, VENDOR + unit.serial.encode())
    if port is not None:
        target_name, relative_port = port
        name = (target_name + ",t,0x0001").encode()
        name = name + b"\0" * (4 - len(name) % 4)
        out += _designator(1, 1, 4, struct.pack(">HH", 0, relative_port), protocol=5)
        out += _designator(3, 2, 8, name, protocol=5)
    return out


def _block_limits(unit: UnitInfo) -> bytes:
    unmap_blocks = 0xFFFFFFFF if unit.thin else 0
    unmap_descriptors = MAX_UNMAP_DESCRIPTORS if unit.thin else 0
    return struct.pack(
        ">BBHIIIIIIIQ",
        0x01,  # WSNZ: WRITE SAME with zero blocks is refused
        MAX_COMPARE_AND_WRITE_BLOCKS,
        1,
        unit.max_transfer_blocks,
        unit.max_transfer_blocks,
        unit.max_transfer_blocks,
        unmap_blocks,
        unmap_descriptors,
        1 if unit.thin else 0,
        0,
        unit.max_transfer_blocks,
    ).ljust(0x3C, b"\0")


def mode_page(page: int, unit: UnitInfo, control: int) -> bytes:
    """One mode page; control is the PC field: 0 current, 1 changeable, 2 default (3, saved, is refused earlier)."""
    if page == PAGE_ERROR_RECOVERY:
        return struct.pack(">BB", page, 0x0A) + (bytes(10) if control == 1 else bytes([0x80]) + bytes(9))
    if page == PAGE_CACHING:
        flags = 0x04 if control in (1, 2) or unit.write_cache else 0
        return struct.pack(">BB", page, 0x12) + bytes([flags]) + bytes(17)
    # Control page: unrestricted reordering (QAM 1), descriptor-free sense, no software write protect.
    body = bytes(10) if control == 1 else bytes([0x02, 0x10, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00])
    return struct.pack(">BB", page, 0x0A) + body
