"""iSCSI PDUs (RFC 7143 section 11): the 48-byte basic header, digests, and builders for every PDU the target sends.

A received PDU keeps its raw header; accessors read the opcode-specific fields. Nothing here touches a socket."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import crc32c

from san.iscsi._wire import header

BHS_LENGTH = 48
RESERVED_TAG = 0xFFFFFFFF


class Opcode(IntEnum):
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MANAGEMENT = 0x02
    LOGIN = 0x03
    TEXT = 0x04
    DATA_OUT = 0x05
    LOGOUT = 0x06
    SNACK = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MANAGEMENT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC = 0x32
    REJECT = 0x3F


INITIATOR_OPCODES = frozenset(op for op in Opcode if op < 0x20)


class RejectReason(IntEnum):
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


def digest(*parts: bytes | bytearray | memoryview) -> bytes:
    """CRC32C over the parts, as iSCSI sends it (least significant byte first)."""
    value = 0
    for part in parts:
        value = crc32c.crc32c(part, value)
    return struct.pack("<I", value)


def padding(length: int) -> int:
    return -length % 4


@dataclass
class PDU:
    """A received PDU: its basic header segment, additional headers and data segment."""

    bhs: bytes
    ahs: bytes = b""
    data: bytes | bytearray | memoryview = b""

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & 0x40)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def final(self) -> bool:
        return bool(self.bhs[1] & 0x80)

    @property
    def lun(self) -> int:
        return decode_lun(self.bhs[8:16])

    @property
    def itt(self) -> int:
        return int.from_bytes(self.bhs[16:20], "big")

    def u32(self, offset: int) -> int:
        return int.from_bytes(self.bhs[offset : offset + 4], "big")

    def u16(self, offset: int) -> int:
        return int.from_bytes(self.bhs[offset : offset + 2], "big")


def header_lengths(bhs: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(AHS bytes, data segment bytes) announced by a basic header."""
    return bhs[4] * 4, int.from_bytes(bhs[5:8], "big")


def decode_lun(field: bytes) -> int:
    """The LUN of an 8-byte LUN field: peripheral (00b) or flat (01b) addressing of the first level."""
    method = field[0] >> 6
    if method in (0, 1):
        return ((field[0] & 0x3F) << 8) | field[1]
    return 0xFFFF


def build(
    opcode: int,
    flags: int,
    data: bytes | bytearray | memoryview = b"",
    lun: int = -1,
    itt: int = RESERVED_TAG,
    words: tuple[int, ...] = (),
    byte2: int = 0,
    byte3: int = 0,
) -> tuple[bytes, bytes | bytearray | memoryview]:
    """(header, data) of a PDU: words fill bytes 20-47 as big-endian 32-bit fields; lun -1 leaves the LUN zero."""
    w = (*words, 0, 0, 0, 0, 0, 0, 0)
    return header(opcode, flags, len(data), lun, itt, w[0], w[1], w[2], w[3], w[4], w[5], w[6], byte2, byte3), data
