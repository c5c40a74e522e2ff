"""A host's view of the target: the LUNs zoned to it, REPORT LUNS, and what an unzoned LUN number answers.

Frontends route every CDB through a LunView, so a host can never reach a vdisk that is not zoned to it."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from san.scsi.disk import Data, Disk, Nexus, Reply
from san.scsi.opcodes import Op
from san.scsi.sense import CheckCondition, Status, UnitAttention, invalid_field, invalid_opcode, lun_not_supported


@dataclass(frozen=True)
class Zoned:
    """One LUN of a host: the vdisk's unit and whether the host may only read it."""

    disk: Disk
    read_only: bool = False


def encode_lun(lun: int) -> bytes:
    """An 8-byte LUN: peripheral addressing below 256, flat addressing above."""
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)


class LunView:
    """The LUNs one initiator sees. luns may be replaced when zoning changes (REPORTED LUNS CHANGED follows)."""

    def __init__(self, nexus: str, luns: dict[int, Zoned]) -> None:
        self.nexus = nexus
        self._set(luns)

    def _set(self, luns: dict[int, Zoned]) -> None:
        self.luns = luns
        self.nexuses = {lun: Nexus(self.nexus, zoned.read_only) for lun, zoned in luns.items()}

    def update(self, luns: dict[int, Zoned]) -> None:
        if set(luns) != set(self.luns) or any(luns[n] != self.luns[n] for n in luns):
            for zoned in luns.values():
                zoned.disk.raise_attention(UnitAttention.REPORTED_LUNS_CHANGED, self.nexus)
        self._set(luns)

    def lost(self) -> None:
        """The nexus ended (logout, connection loss, reinstatement)."""
        for zoned in self.luns.values():
            zoned.disk.nexus_lost(self.nexus)

    def execute_now(self, lun: int, cdb: bytes, data_out: Data = b"", arrived: int = 0) -> Reply | None:
        """The disk's fast path for reads and writes (None: use execute()); with arrived, what it does is counted."""
        zoned = self.luns.get(lun)
        if zoned is None:
            return None
        return zoned.disk.execute_now(self.nexuses[lun], cdb, data_out, None, arrived)

    async def execute(self, lun: int, cdb: bytes, data_out: Data = b"") -> Reply:
        zoned = self.luns.get(lun)
        if cdb and cdb[0] == Op.REPORT_LUNS:
            return self.report_luns(cdb)
        if zoned is None:
            return self._no_unit(cdb)
        return await zoned.disk.execute(Nexus(self.nexus, zoned.read_only), cdb, data_out)

    def report_luns(self, cdb: bytes) -> Reply:
        try:
            select = cdb[2]
            allocation = struct.unpack_from(">I", cdb, 6)[0]
            if select not in (0x00, 0x01, 0x02):
                raise invalid_field(2)
            if allocation < 16:
                raise invalid_field(6)
        except CheckCondition as condition:
            return Reply(Status.CHECK_CONDITION, sense=condition.sense)
        except (IndexError, struct.error):
            return Reply(Status.CHECK_CONDITION, sense=invalid_field(0).sense)
        for other in self.luns.values():  # the initiator has the new list: no LUN of this nexus needs to say so
            pending = other.disk.attentions.get(self.nexus, [])
            if UnitAttention.REPORTED_LUNS_CHANGED in pending:
                pending.remove(UnitAttention.REPORTED_LUNS_CHANGED)
        numbers = sorted(self.luns) if select != 0x01 else []
        body = b"".join(encode_lun(n) for n in numbers)
        return Reply(data=(struct.pack(">I4x", len(body)) + body)[:allocation])

    @staticmethod
    def _no_unit(cdb: bytes) -> Reply:
        """A LUN number nothing is zoned at: INQUIRY says so (qualifier 3), REQUEST SENSE reports it, the rest fail."""
        if cdb and cdb[0] == Op.INQUIRY and len(cdb) >= 5:
            if cdb[1] & 0x01:
                return Reply(Status.CHECK_CONDITION, sense=lun_not_supported().sense)
            allocation = struct.unpack_from(">H", cdb, 3)[0]
            return Reply(data=(bytes([0x7F, 0, 0x06, 0x12, 31]) + bytes(31))[:allocation])
        if cdb and cdb[0] == Op.REQUEST_SENSE and len(cdb) >= 5:
            return Reply(data=lun_not_supported().sense[: cdb[4]])
        condition = lun_not_supported() if cdb else invalid_opcode()
        return Reply(Status.CHECK_CONDITION, sense=condition.sense)
