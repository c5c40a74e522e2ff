"""An iSCSI session: who the initiator is, its command numbering window (serial arithmetic), and its LUN view.

Commands are taken in CmdSN order; ones ahead of ExpCmdSN wait, ones outside the window are dropped (RFC 7143 4.2.2.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from san.iscsi.keys import Parameters
from san.scsi.luns import LunView

QUEUE_DEPTH = 128
SERIAL_HALF = 1 << 31


def serial_lt(a: int, b: int) -> bool:
    """a < b in 32-bit serial number arithmetic (RFC 1982)."""
    return a != b and (b - a) % (1 << 32) < SERIAL_HALF


def serial_add(a: int, n: int) -> int:
    return (a + n) & 0xFFFFFFFF


@dataclass
class Session:
    """One logged-in session; MaxConnections is 1, so it has one connection at a time."""

    initiator: str
    isid: bytes
    tsih: int
    discovery: bool
    view: LunView
    params: Parameters
    exp_cmd_sn: int = 0
    held: dict[int, Any] = field(default_factory=dict)
    connection: Any = None

    @property
    def max_cmd_sn(self) -> int:
        return serial_add(self.exp_cmd_sn, QUEUE_DEPTH - 1)  # a window that never shrinks (initiators cannot tell)

    def in_window(self, cmd_sn: int) -> bool:
        return not serial_lt(cmd_sn, self.exp_cmd_sn) and not serial_lt(self.max_cmd_sn, cmd_sn)

    def accept(self, cmd_sn: int, item: Any) -> list[Any]:
        """Take a non-immediate PDU numbered cmd_sn; returns the PDUs now in order (none if it waits or is dropped)."""
        if cmd_sn == self.exp_cmd_sn and not self.held:
            self.exp_cmd_sn = (cmd_sn + 1) & 0xFFFFFFFF
            return [item]
        if not self.in_window(cmd_sn) or cmd_sn in self.held:
            return []
        self.held[cmd_sn] = item
        ready = []
        while self.exp_cmd_sn in self.held:
            ready.append(self.held.pop(self.exp_cmd_sn))
            self.exp_cmd_sn = serial_add(self.exp_cmd_sn, 1)
        return ready
