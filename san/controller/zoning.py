"""Hosts and zoning: which initiator (by iSCSI name, with CHAP credentials) sees which vdisks, at which LUNs.

Every change is checked under its host's and vdisk's locks and committed before it returns; then the frontends are
told to re-read it."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from san.controller.locks import Locks
from san.errors import Conflict, InvalidRequest, NotFound
from san.model import Host, VDisk, Zone, check_name, host_by_iqn, shown
from san.store.metadata import Metadata

log = logging.getLogger("san.zoning")
MAX_LUN = 16383  # flat addressing
# RFC 3722 names are stringprep'd UTF-8 without controls or spaces; san takes the printable ASCII that hosts use.
IQN = re.compile(r"iqn\.\d{4}-\d{2}(\.[a-z0-9][a-z0-9-]*)+(:[!-~]+)?")
EUI = re.compile(r"eui\.[0-9A-Fa-f]{16}")
NAA = re.compile(r"naa\.([0-9A-Fa-f]{16}|[0-9A-Fa-f]{32})")
CHAP_TEXT = re.compile(r"[!-~]{1,255}")  # printable ASCII, no spaces
MIN_SECRET = 12


def check_iscsi_name(iqn: str) -> None:
    """An iSCSI name as RFC 7143 section 4.2.7 gives it: iqn., eui. or naa. form, at most 223 bytes."""
    if len(iqn.encode()) > 223 or not (IQN.fullmatch(iqn) or EUI.fullmatch(iqn) or NAA.fullmatch(iqn)):
        raise InvalidRequest(f"{shown(iqn)} is not an iSCSI name (like iqn.2005-03.org.example:host1, lowercase)")


def check_chap(kind: str, user: str, secret: str) -> None:
    if not user and not secret:
        return
    if not CHAP_TEXT.fullmatch(user):
        raise InvalidRequest(f"{kind} user must be 1-255 printable characters without spaces")
    if not CHAP_TEXT.fullmatch(secret) or len(secret) < MIN_SECRET:
        raise InvalidRequest(f"{kind} secret must be {MIN_SECRET}-255 printable characters without spaces")


class Zoning:
    """The hosts and zones of one controller (its metadata, its vdisks, its locks)."""

    def __init__(self, metadata: Metadata, vdisks: Callable[[], dict[int, VDisk]], locks: Locks) -> None:
        self.metadata = metadata
        self.vdisks = vdisks
        self.locks = locks
        self.hosts: dict[int, Host] = {h.id: h for h in metadata.store.hosts()}
        self.zones: list[Zone] = metadata.store.zones()
        self.on_change: Callable[[], None] | None = None

    def host(self, name: str) -> Host:
        for host in self.hosts.values():
            if host.name == name:
                return host
        raise NotFound(f"no host named {shown(name)}")

    def by_iqn(self, iqn: str) -> Host | None:
        return host_by_iqn(self.hosts.values(), iqn)

    def zones_of(self, host: Host) -> list[Zone]:
        return [z for z in self.zones if z.host_id == host.id]

    async def create_host(
        self, name: str, iqn: str, chap: tuple[str, str] = ("", ""), mutual: tuple[str, str] = ("", "")
    ) -> Host:
        check_name("host", name)
        check_iscsi_name(iqn)
        check_chap("CHAP", *chap)
        check_chap("mutual CHAP", *mutual)
        if mutual[0] and not chap[0]:
            raise InvalidRequest("mutual CHAP needs one-way CHAP too (--chap-user and a CHAP secret)")
        if chap[0] and chap[1] == mutual[1]:
            raise InvalidRequest("the mutual CHAP secret must differ from the host's CHAP secret")
        async with self.locks.hold(("host", name), ("iqn", iqn)):
            if any(h.name == name for h in self.hosts.values()):
                raise Conflict(f"host {name!r} already exists")
            other = self.by_iqn(iqn)
            if other is not None:
                raise Conflict(f"{iqn} is already host {other.name!r}")
            host = await self.metadata.commit_async(lambda store: store.add_host(name, iqn, (*chap, *mutual)))
            assert host is not None
            self.hosts[host.id] = host
        if not chap[0]:
            log.warning("host %s (%s) has no CHAP: any initiator that claims its name logs in as it", name, iqn)
        self._changed()
        return host

    async def modify_host(
        self, name: str, iqn: str | None = None, chap: tuple[str, str] | None = None, mutual: tuple[str, str] | None = None
    ) -> Host:
        """Give a host another iSCSI name or CHAP credentials (None keeps them; ("", "") removes them), zones kept.
        Sessions already logged in go on; the next login is checked against the new ones."""
        current = self.host(name)
        iqn = current.iqn if iqn is None else iqn
        chap = (current.chap_user, current.chap_secret) if chap is None else chap
        mutual = (current.mutual_user, current.mutual_secret) if mutual is None else mutual
        if not chap[0]:
            mutual = ("", "") if mutual == (current.mutual_user, current.mutual_secret) else mutual
        check_iscsi_name(iqn)
        check_chap("CHAP", *chap)
        check_chap("mutual CHAP", *mutual)
        if mutual[0] and not chap[0]:
            raise InvalidRequest("mutual CHAP needs one-way CHAP too (a CHAP user and secret)")
        if chap[0] and chap[1] == mutual[1]:
            raise InvalidRequest("the mutual CHAP secret must differ from the host's CHAP secret")
        async with self.locks.hold(("host", name), ("iqn", iqn)):
            host = self.host(name)
            other = self.by_iqn(iqn)
            if other is not None and other.id != host.id:
                raise Conflict(f"{iqn} is already host {other.name!r}")
            changed = Host(host.id, host.name, iqn, *chap, *mutual)
            await self.metadata.commit_async(lambda store: store.update_host(changed))
            self.hosts[host.id] = changed
        if not chap[0]:
            log.warning("host %s (%s) has no CHAP: any initiator that claims its name logs in as it", name, iqn)
        self._changed()
        return changed

    async def delete_host(self, name: str) -> None:
        async with self.locks.hold(("host", name)):
            host = self.host(name)
            zoned = self.zones_of(host)
            if zoned:
                names = ", ".join(sorted(self.vdisks()[z.vdisk_id].name for z in zoned))
                raise Conflict(f"host {name!r} still sees {names}; remove its zones first")
            await self.metadata.commit_async(lambda store: store.delete_host(host.id))
            del self.hosts[host.id]
        self._changed()

    async def add(self, host_name: str, vdisk_name: str, lun: int | None = None, read_only: bool = False) -> Zone:
        """Zone a vdisk to a host at lun (default: the lowest free LUN number)."""
        async with self.locks.hold(("host", host_name), ("vdisk", vdisk_name)):
            host = self.host(host_name)
            vdisk = self._vdisk(vdisk_name)
            if vdisk.state not in ("ready", "allocating"):
                raise Conflict(f"vdisk {vdisk.name!r} is {vdisk.state}")
            if vdisk.origin and not read_only:
                raise InvalidRequest(f"{vdisk.name!r} is a snapshot, read-only: zone it with --read-only")
            current = self.zones_of(host)
            if any(z.vdisk_id == vdisk.id for z in current):
                raise Conflict(f"{vdisk.name!r} is already zoned to host {host.name!r}")
            used = {z.lun for z in current}
            if lun is None:
                lun = next(n for n in range(MAX_LUN + 1) if n not in used)
            if not 0 <= lun <= MAX_LUN:
                raise InvalidRequest(f"LUN {lun} must be 0-{MAX_LUN}")
            if lun in used:
                raise Conflict(f"host {host.name!r} already has LUN {lun}")
            zone = Zone(host.id, vdisk.id, lun, read_only)
            await self.metadata.commit_async(lambda store: store.add_zone(zone))
            self.zones.append(zone)
        self._changed()
        return zone

    async def modify(self, host_name: str, vdisk_name: str, lun: int | None = None, read_only: bool | None = None) -> Zone:
        """Move a zone to another LUN or make it read-only or read-write (None keeps it); the host is told its LUNs
        changed (REPORTED LUNS DATA HAS CHANGED)."""
        async with self.locks.hold(("host", host_name), ("vdisk", vdisk_name)):
            host = self.host(host_name)
            vdisk = self._vdisk(vdisk_name)
            zone = next((z for z in self.zones if z.host_id == host.id and z.vdisk_id == vdisk.id), None)
            if zone is None:
                raise NotFound(f"{vdisk.name!r} is not zoned to host {host.name!r}")
            lun = zone.lun if lun is None else lun
            if not 0 <= lun <= MAX_LUN:
                raise InvalidRequest(f"LUN {lun} must be 0-{MAX_LUN}")
            if any(z.lun == lun and z is not zone for z in self.zones_of(host)):
                raise Conflict(f"host {host.name!r} already has LUN {lun}")
            if vdisk.origin and read_only is False:
                raise InvalidRequest(f"{vdisk.name!r} is a snapshot: it can only be zoned read-only")
            changed = Zone(host.id, vdisk.id, lun, zone.read_only if read_only is None else read_only)
            await self.metadata.commit_async(lambda store: store.update_zone(changed))
            self.zones[self.zones.index(zone)] = changed
        self._changed()
        return changed

    async def remove(self, host_name: str, vdisk_name: str) -> None:
        async with self.locks.hold(("host", host_name), ("vdisk", vdisk_name)):
            host = self.host(host_name)
            vdisk = self._vdisk(vdisk_name)
            zone = next((z for z in self.zones if z.host_id == host.id and z.vdisk_id == vdisk.id), None)
            if zone is None:
                raise NotFound(f"{vdisk.name!r} is not zoned to host {host.name!r}")
            await self.metadata.commit_async(lambda store: store.delete_zone(host.id, vdisk.id))
            self.zones.remove(zone)
        self._changed()

    def _vdisk(self, name: str) -> VDisk:
        for vdisk in self.vdisks().values():
            if vdisk.name == name:
                return vdisk
        raise NotFound(f"no vdisk named {shown(name)}")

    def check_unzoned(self, vdisk: VDisk) -> None:
        """A vdisk zoned to a host cannot be deleted from under it."""
        hosts = sorted(self.hosts[z.host_id].name for z in self.zones if z.vdisk_id == vdisk.id)
        if hosts:
            raise Conflict(f"vdisk {vdisk.name!r} is zoned to {', '.join(hosts)}; remove the zones first")

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
