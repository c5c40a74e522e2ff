"""The target as the iSCSI layer sees it: its name, its portals, its live sessions, and who may log in to see what.

The access lookup is the zoning of the controller; refresh() re-reads it for every live session."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from san.iscsi.chap import Credentials
from san.iscsi.guard import LoginGuard
from san.scsi.luns import Zoned
from san.throttle import Throttle

if TYPE_CHECKING:
    from san.iscsi.session import Session

PORTAL_GROUP_TAG = 1


@dataclass
class Access:
    """What one initiator may do: the CHAP credentials it must prove (if any) and the LUNs zoned to it."""

    luns: dict[int, Zoned]
    credentials: Credentials | None = None


Lookup = Callable[[str], Access | None]


@dataclass
class Target:
    """One iSCSI target name served on some portals; lookup(initiator name) is None for unknown initiators."""

    name: str
    portals: list[tuple[str, int]]
    lookup: Lookup
    sessions: dict[tuple[str, bytes], Session] = field(default_factory=dict)
    next_tsih: int = 1
    guard: LoginGuard = field(default_factory=LoginGuard)
    refusals: Throttle = field(default_factory=Throttle)
    io_stats: bool = True  # count each command in its vdisk's I/O statistics (off: metrics are off)

    def allocate_tsih(self) -> int:
        used = {s.tsih for s in self.sessions.values()}
        while self.next_tsih in used or self.next_tsih == 0:
            self.next_tsih = (self.next_tsih + 1) & 0xFFFF
        tsih = self.next_tsih
        self.next_tsih = (self.next_tsih + 1) & 0xFFFF
        return tsih

    def addresses(self, local: tuple[str, int] | None) -> list[str]:
        """TargetAddress values for SendTargets: each portal, a wildcard portal as the address the initiator used."""
        out = []
        for host, port in self.portals:
            if host in ("0.0.0.0", "::", "") and local is not None:
                host = local[0]
            shown = f"[{host}]" if ":" in host else host
            out.append(f"{shown}:{port},{PORTAL_GROUP_TAG}")
        return out

    def refresh(self) -> None:
        """Zoning changed: every live session gets its host's new LUNs (and a REPORTED LUNS CHANGED attention)."""
        for session in list(self.sessions.values()):
            access = self.lookup(session.initiator)
            session.view.update(access.luns if access is not None else {})
