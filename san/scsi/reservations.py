"""Persistent reservations (SPC-4 5.13): registrations per I_T nexus, one reservation per logical unit, and the
PERSISTENT RESERVE IN/OUT service actions, with the reservation conflicts and unit attentions they imply.

Nexus names are iSCSI TransportIDs in their "name,i,0xISID" form, so REGISTER AND MOVE can name its target nexus."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from san.scsi.sense import (
    CheckCondition,
    Key,
    UnitAttention,
    invalid_field,
    invalid_parameter,
    parameter_list_length_error,
)


class PRType(IntEnum):
    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8


REGISTRANTS_TYPES = frozenset({5, 6, 7, 8})
ALL_REGISTRANTS_TYPES = frozenset({7, 8})
EXCLUSIVE_ACCESS_TYPES = frozenset({3, 6, 8})
# PERSISTENT RESERVE OUT service actions.
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_AND_IGNORE, REGISTER_AND_MOVE = range(8)
# PERSISTENT RESERVE IN service actions.
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = range(4)
ISCSI_PROTOCOL = 0x5


class Conflict(Exception):
    """The command ends with RESERVATION CONFLICT status."""


@dataclass
class Reservations:
    """The persistent reservation state of one logical unit."""

    notify: Callable[[str, UnitAttention], None]
    keys: dict[str, int] = field(default_factory=dict)
    holder: str | None = None
    type: int = 0
    generation: int = 0

    @property
    def reserved(self) -> bool:
        return self.holder is not None

    def is_holder(self, nexus: str) -> bool:
        if self.holder is None:
            return False
        if self.type in ALL_REGISTRANTS_TYPES:
            return nexus in self.keys
        return self.holder == nexus

    def blocks(self, nexus: str, writes: bool) -> bool:
        """Whether a command from nexus meets a reservation conflict (reads only conflict for exclusive access)."""
        if self.holder is None or self.is_holder(nexus):
            return False
        if self.type in REGISTRANTS_TYPES and nexus in self.keys:
            return False
        return writes or self.type in EXCLUSIVE_ACCESS_TYPES

    # -- PERSISTENT RESERVE IN -----------------------------------------------------------------------------

    def read(self, cdb: bytes) -> bytes:
        action = cdb[1] & 0x1F
        allocation = struct.unpack_from(">H", cdb, 7)[0]
        if action == READ_KEYS:
            body = b"".join(struct.pack(">Q", key) for key in self.keys.values())
            data = struct.pack(">II", self.generation, len(body)) + body
        elif action == READ_RESERVATION:
            body = b""
            if self.holder is not None:
                key = 0 if self.type in ALL_REGISTRANTS_TYPES else self.keys.get(self.holder, 0)
                body = struct.pack(">QIBBH", key, 0, 0, self.type, 0)
            data = struct.pack(">II", self.generation, len(body)) + body
        elif action == REPORT_CAPABILITIES:
            # ATP_C: ALL_TG_PT accepted (one target port); TMV with WR_EX_AR .. EX_AC_AR all supported.
            mask = 0x80 | 0x40 | 0x20 | 0x08 | 0x02, 0x01
            data = struct.pack(">HBBBBH", 8, 0x04, 0x80 | 0x10, mask[0], mask[1], 0)
        elif action == READ_FULL_STATUS:
            body = b""
            for nexus, key in self.keys.items():
                holder = 0x01 if self.is_holder(nexus) else 0
                scope_type = self.type if holder else 0
                transport = transport_id(nexus)
                body += struct.pack(">Q4xBB4xHI", key, holder, scope_type, 1, len(transport)) + transport
            data = struct.pack(">II", self.generation, len(body)) + body
        else:
            raise invalid_field(1)
        return data[:allocation]

    # -- PERSISTENT RESERVE OUT ----------------------------------------------------------------------------

    def out(self, nexus: str, cdb: bytes, params: bytes) -> None:
        """Carry out one PERSISTENT RESERVE OUT; raises Conflict or CheckCondition."""
        action = cdb[1] & 0x1F
        scope, kind = cdb[2] >> 4, cdb[2] & 0x0F
        length = struct.unpack_from(">I", cdb, 5)[0]
        if action > REGISTER_AND_MOVE:
            raise invalid_field(1)
        if action != REGISTER_AND_MOVE and length != 24 and not (length > 24 and params[20:21] and params[20] & 0x08):
            raise parameter_list_length_error()
        if len(params) < 24:
            raise parameter_list_length_error()
        key, action_key = struct.unpack_from(">QQ", params, 0)
        flags = params[20] if action != REGISTER_AND_MOVE else params[17]
        if action != REGISTER_AND_MOVE and flags & 0x08:
            raise invalid_parameter(20, 3)  # SPEC_I_PT is not supported
        if flags & 0x01:
            raise invalid_parameter(20 if action != REGISTER_AND_MOVE else 17, 0)  # APTPL: not persisted
        typed = action in (RESERVE, PREEMPT, PREEMPT_AND_ABORT, REGISTER_AND_MOVE)
        if typed or (action == RELEASE and self.is_holder(nexus)):
            if scope != 0:
                raise invalid_field(2, 4)  # only logical-unit scope
            if kind not in PRType._value2member_map_:
                raise invalid_field(2, 0)
        if action in (REGISTER, REGISTER_AND_IGNORE):
            self._register(nexus, key, action_key, action == REGISTER_AND_IGNORE)
            return
        registered = self.keys.get(nexus)
        if registered is None or registered != key:
            raise Conflict()
        if action == RESERVE:
            self._reserve(nexus, kind)
        elif action == RELEASE:
            self._release(nexus, kind)
        elif action == CLEAR:
            self._clear(nexus)
        elif action in (PREEMPT, PREEMPT_AND_ABORT):
            self._preempt(nexus, action_key, kind)
        else:
            self._move(nexus, action_key, kind, params)

    def _register(self, nexus: str, key: int, new_key: int, ignore: bool) -> None:
        current = self.keys.get(nexus)
        if current is None:
            if key != 0 and not ignore:
                raise Conflict()
            if new_key:
                self.keys[nexus] = new_key
                self.generation += 1
            return
        if current != key and not ignore:
            raise Conflict()
        if new_key:
            self.keys[nexus] = new_key
        else:
            self._unregister(nexus)
        self.generation += 1

    def _unregister(self, nexus: str) -> None:
        del self.keys[nexus]
        if self.holder is None:
            return
        if self.type in ALL_REGISTRANTS_TYPES:
            if not self.keys:
                self.holder = None
            elif self.holder == nexus:
                self.holder = next(iter(self.keys))
            return
        if self.holder == nexus:
            released_type = self.type
            self.holder = None
            if released_type in REGISTRANTS_TYPES:
                self._tell_others(nexus, UnitAttention.RESERVATIONS_RELEASED)

    def _reserve(self, nexus: str, kind: int) -> None:
        if self.holder is None:
            self.holder, self.type = nexus, kind
            return
        if not self.is_holder(nexus) or self.type != kind:
            raise Conflict()

    def _release(self, nexus: str, kind: int) -> None:
        if self.holder is None or not self.is_holder(nexus):
            return
        if kind != self.type:
            raise CheckCondition(Key.ILLEGAL_REQUEST, 0x26, 0x04, "invalid release of persistent reservation")
        released_type = self.type
        self.holder = None
        if released_type in REGISTRANTS_TYPES:
            self._tell_others(nexus, UnitAttention.RESERVATIONS_RELEASED)

    def _clear(self, nexus: str) -> None:
        self._tell_others(nexus, UnitAttention.RESERVATIONS_PREEMPTED)
        self.keys.clear()
        self.holder = None
        self.generation += 1

    def _preempt(self, nexus: str, victim_key: int, kind: int) -> None:
        if self.holder is not None and self.type in ALL_REGISTRANTS_TYPES:
            if victim_key == 0:
                for other in [n for n in self.keys if n != nexus]:
                    del self.keys[other]
                    self.notify(other, UnitAttention.REGISTRATIONS_PREEMPTED)
                self.holder, self.type = nexus, kind
            else:
                self._remove_key(victim_key, nexus, must_exist=True)
            self.generation += 1
            return
        if self.holder is not None and self.keys.get(self.holder) == victim_key:
            self._remove_key(victim_key, nexus, must_exist=False)
            self.holder, self.type = nexus, kind
            self.generation += 1
            return
        if victim_key == 0:
            raise invalid_parameter(8)
        self._remove_key(victim_key, nexus, must_exist=True)
        self.generation += 1

    def _remove_key(self, victim_key: int, nexus: str, must_exist: bool) -> None:
        victims = [n for n, k in self.keys.items() if k == victim_key and n != nexus]
        if must_exist and not victims and self.keys.get(nexus) != victim_key:
            raise Conflict()
        for victim in victims:
            del self.keys[victim]
            self.notify(victim, UnitAttention.REGISTRATIONS_PREEMPTED)
            if self.holder == victim:
                self.holder = None

    def _move(self, nexus: str, new_key: int, kind: int, params: bytes) -> None:
        if not self.is_holder(nexus) or self.type in ALL_REGISTRANTS_TYPES:
            raise Conflict()
        length = struct.unpack_from(">I", params, 20)[0]
        destination = parse_transport_id(params[24 : 24 + length])
        if destination is None or new_key == 0:
            raise invalid_parameter(24)
        if destination == nexus:
            raise invalid_parameter(24)
        unregister = bool(params[17] & 0x02)
        self.keys[destination] = new_key
        self.holder, self.type = destination, kind
        if unregister:
            del self.keys[nexus]
        self.generation += 1

    def _tell_others(self, nexus: str, condition: UnitAttention) -> None:
        for other in self.keys:
            if other != nexus:
                self.notify(other, condition)


def transport_id(nexus: str) -> bytes:
    """The iSCSI TransportID (format 01h: name,i,0xISID) of a nexus, NUL-terminated and padded to 4 bytes."""
    name = nexus.encode() + b"\0"
    name += bytes(-len(name) % 4)
    return struct.pack(">BBH", 0x40 | ISCSI_PROTOCOL, 0, len(name)) + name


def parse_transport_id(data: bytes) -> str | None:
    if len(data) < 4 or data[0] & 0x0F != ISCSI_PROTOCOL:
        return None
    length = struct.unpack_from(">H", data, 2)[0]
    name = data[4 : 4 + length].split(b"\0", 1)[0]
    try:
        text = name.decode()
    except UnicodeDecodeError:
        return None
    name_part, sep, isid = text.partition(",i,0x")
    if not sep or not name_part or not isid:
        return None  # format 00 names an initiator, not one of its ports
    return f"{name_part.lower()},i,0x{isid.lower()}"
