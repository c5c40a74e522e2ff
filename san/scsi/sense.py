"""SCSI status codes, sense keys and the CheckCondition exception that carries them to the frontend.

Sense data is built in fixed format (response code 70h), with the INFORMATION field when one is given."""

from __future__ import annotations

import struct
from enum import IntEnum


class Status(IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    TASK_ABORTED = 0x40


class Key(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


SENSE_LENGTH = 18


def fixed_sense(key: int, asc: int, ascq: int, information: int | None = None, sks: bytes = b"") -> bytes:
    """Fixed-format sense data; information sets the VALID bit, sks (3 bytes) the sense-key specific field."""
    valid = 0x80 if information is not None else 0
    info = (information or 0) & 0xFFFFFFFF
    return struct.pack(">BBBIB4sBBB3s", 0x70 | valid, 0, key, info, SENSE_LENGTH - 8, b"", asc, ascq, 0, sks.ljust(3, b"\0")[:3])


class CheckCondition(Exception):
    """A command ends in CHECK CONDITION with this sense."""

    def __init__(
        self, key: int, asc: int, ascq: int, message: str = "", information: int | None = None, sks: bytes = b""
    ) -> None:
        super().__init__(message or f"sense {key:X}/{asc:02X}/{ascq:02X}")
        self.key, self.asc, self.ascq = key, asc, ascq
        self.information = information
        self.sks = sks

    @property
    def sense(self) -> bytes:
        return fixed_sense(self.key, self.asc, self.ascq, self.information, self.sks)


def field_pointer(byte: int, bit: int | None = None, in_cdb: bool = True) -> bytes:
    """Sense-key specific bytes for ILLEGAL REQUEST: which byte (and bit) of the CDB or parameter list is wrong."""
    flags = 0x80 | (0x40 if in_cdb else 0) | (0x08 | bit if bit is not None else 0)
    return struct.pack(">BH", flags, byte)


def invalid_opcode() -> CheckCondition:
    return CheckCondition(Key.ILLEGAL_REQUEST, 0x20, 0x00, "invalid command operation code", sks=field_pointer(0))


def invalid_field(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(Key.ILLEGAL_REQUEST, 0x24, 0x00, f"invalid field in CDB byte {byte}", sks=field_pointer(byte, bit))


def invalid_parameter(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(
        Key.ILLEGAL_REQUEST, 0x26, 0x00, f"invalid field in parameter list byte {byte}", sks=field_pointer(byte, bit, False)
    )


def parameter_list_length_error() -> CheckCondition:
    return CheckCondition(Key.ILLEGAL_REQUEST, 0x1A, 0x00, "parameter list length error")


def lba_out_of_range() -> CheckCondition:
    return CheckCondition(Key.ILLEGAL_REQUEST, 0x21, 0x00, "logical block address out of range")


def lun_not_supported() -> CheckCondition:
    return CheckCondition(Key.ILLEGAL_REQUEST, 0x25, 0x00, "logical unit not supported")


def write_protected() -> CheckCondition:
    return CheckCondition(Key.DATA_PROTECT, 0x27, 0x00, "write protected")


def space_allocation_failed() -> CheckCondition:
    return CheckCondition(Key.DATA_PROTECT, 0x27, 0x07, "space allocation failed write protect")


def medium_error(message: str = "") -> CheckCondition:
    return CheckCondition(Key.MEDIUM_ERROR, 0x11, 0x00, message or "unrecovered read error")


def write_error(message: str = "") -> CheckCondition:
    return CheckCondition(Key.MEDIUM_ERROR, 0x0C, 0x00, message or "write error")


def miscompare(offset: int) -> CheckCondition:
    return CheckCondition(Key.MISCOMPARE, 0x1D, 0x00, "miscompare during verify operation", information=offset)


class UnitAttention(IntEnum):
    """The unit attention conditions a nexus can have pending, in the order they are reported."""

    POWER_ON_RESET = 0x2900
    BUS_DEVICE_RESET = 0x2903
    CAPACITY_CHANGED = 0x2A09
    MODE_PARAMETERS_CHANGED = 0x2A01
    RESERVATIONS_PREEMPTED = 0x2A03
    RESERVATIONS_RELEASED = 0x2A04
    REGISTRATIONS_PREEMPTED = 0x2A05
    SOFT_THRESHOLD = 0x3807
    REPORTED_LUNS_CHANGED = 0x3F0E

    def check_condition(self) -> CheckCondition:
        return CheckCondition(Key.UNIT_ATTENTION, self >> 8, self & 0xFF, f"unit attention {self.name.lower()}")
