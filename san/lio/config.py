"""LIO's configuration, reconciled to the controller's with rtslib-fb: a `user:san` storage object per vdisk (san's own,
or an admin's from targetcli), one iSCSI target with a TPG and portals, per host a NodeACL with a MappedLUN per zone."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import rtslib
from rtslib.utils import RTSLibError

from san.lio import cfgstring
from san.model import Host, VDisk, Zone

log = logging.getLogger("san.lio")

TPG_TAG = 1
DBROOT = "/etc/target"
MAX_TRANSFER_BYTES = 8 << 20  # as VPD B0h says (san.scsi.pages)


@dataclass
class Wanted:
    """What LIO should show: a snapshot of the controller's vdisks, hosts and zones, and of the handler's devices."""

    vdisks: list[VDisk] = field(default_factory=list)
    hosts: list[Host] = field(default_factory=list)
    zones: list[Zone] = field(default_factory=list)
    adopted: cfgstring.Served = field(default_factory=cfgstring.Served)  # an admin's objects the handler has, and their vdisks
    adopting: set[str] = field(default_factory=set)  # vdisks being made for an admin's object: none of san's own
    deleted: set[str] = field(default_factory=set)  # serials of the vdisks the controller deleted (where it is known)

    def gone(self, binding: tuple[int, str]) -> bool:
        """Whether the vdisk an admin's object is bound to is known to be deleted (its id taken by another, or the
        controller deleted it); one merely not ready, or unknown here (another controller's?), is not."""
        vdisk_id, serial = binding
        return serial in self.deleted or any(v.id == vdisk_id and v.serial != serial for v in self.vdisks)


class LioError(Exception):
    """Some objects could not be configured (the rest were); the message names each."""


def _root() -> rtslib.RTSRoot:
    """rtslib's view of configfs. LIO writes persistent-reservation and ALUA state under /etc/target (its pr/ and
    alua/ directories are made here if missing: without them every PERSISTENT RESERVE OUT fails). rtslib caches
    which backstore index holds which storage object for the life of the process; targetcli changes configfs too,
    so the cache is dropped and configfs read again each time."""
    for sub in ("pr", "alua"):
        os.makedirs(os.path.join(DBROOT, sub), exist_ok=True)
    rtslib.tcm.bs_cache.clear()
    return rtslib.RTSRoot()


def config_of(vdisk: VDisk) -> str:
    return f"{cfgstring.SUBTYPE}/{vdisk.id}"


def object_key(so: rtslib.StorageObject) -> str:
    """`user_<hba>/<name>`: a storage object as TcmuHandler.adopted() names it."""
    return "/".join(so.path.split("/")[-2:])


def user_config(so: rtslib.StorageObject) -> cfgstring.UserConfig | None:
    """An admin's object's cfgstring, read; None when it is not one san takes (it is then left alone)."""
    try:
        return cfgstring.parse(cfgstring.of_device(str(so.config or "")))
    except cfgstring.CfgStringError:
        return None


class LioConfig:
    """san's part of LIO: storage objects whose config is `san/<vdisk id>` and the target named target_name; an
    admin's `user:san` objects are bound to their vdisks (and deleted with them), and otherwise left alone."""

    def __init__(self, target_name: str, portals: list[tuple[str, int]], open_access: bool = False) -> None:
        self.target_name = target_name
        self.portals = portals
        self.open_access = open_access
        self.warned: set[str] = set()  # vdisks already said to be held back by an admin's object of their name

    def ours(self, root: rtslib.RTSRoot, admins: bool = False) -> dict[str, rtslib.UserBackedStorageObject]:
        """san's own storage objects by config (`san/<vdisk id>`), or with admins those made in targetcli (their
        configs alike: by object_key). Other backstores' objects (fileio, block, ...) are never looked into."""
        found = {}
        for so in root.storage_objects:
            if so.plugin != "user":
                continue
            subtype, _, config = str(so.config or "").partition("/")
            if subtype == cfgstring.SUBTYPE and cfgstring.is_vdisk_id(config) != admins:
                found[object_key(so) if admins else so.config] = so
        return found

    def reconcile(self, wanted: Wanted) -> None:
        """Make LIO match wanted (runs in a worker thread: enabling a device waits for the handler's answer). An
        object that cannot be configured is skipped, the rest done, and LioError names each that failed."""
        root = _root()
        problems: list[str] = []
        objects = self._storage_objects(root, wanted, problems)
        tpg = self._tpg()
        luns = self._luns(tpg, objects)
        self._acls(tpg, wanted, luns)
        tpg.enable = True
        if problems:
            raise LioError("; ".join(problems))

    def _storage_objects(self, root: rtslib.RTSRoot, wanted: Wanted, problems: list[str]) -> dict[int, rtslib.StorageObject]:
        """Each ready vdisk's storage object: san's own where it has one (LUNs do not move), else the admin's that the
        handler serves for it, else a new one of san's (san's are remade when their name or serial is not the
        vdisk's)."""
        ready = {v.id: v for v in wanted.vdisks if v.state == "ready"}
        own = {}
        for config, so in self.ours(root).items():
            vdisk = ready.get(int(config.partition("/")[2]))
            if vdisk is None or so.name != vdisk.name or str(so.wwn).lower() != vdisk.serial.lower():
                log.info("LIO: removing storage object %s (%s)", so.name, config)
                so.delete()
            else:
                own[vdisk.id] = so
        objects: dict[int, rtslib.StorageObject] = {}
        held: set[int] = set()  # vdisks bound to an admin's object, served or not: san makes none of its own
        taken: set[str] = set()  # names an admin's object holds
        for key, so in self.ours(root, admins=True).items():
            try:
                if self._admins_object(key, so, wanted, {i: v for i, v in ready.items() if i not in own}, objects, held):
                    taken.add(so.name)
            except (RTSLibError, OSError) as exc:
                if os.path.isdir(so.path):  # not one targetcli removed meanwhile (a refused create, a delete)
                    problems.append(f"user:{cfgstring.SUBTYPE}/{so.name}: {exc}")
        for vdisk in ready.values():
            if vdisk.id in objects:
                continue
            if vdisk.id not in own and (vdisk.id in held or vdisk.name in wanted.adopting):
                continue
            if vdisk.id not in own and vdisk.name in taken:
                if vdisk.name not in self.warned:
                    self.warned.add(vdisk.name)
                    log.warning("LIO: vdisk %s has no storage object: user:%s/%s, made in targetcli for another "
                                "vdisk or for none, holds its name", vdisk.name, cfgstring.SUBTYPE, vdisk.name)  # fmt: skip
                continue
            self.warned.discard(vdisk.name)
            try:
                objects[vdisk.id] = self._own_object(vdisk, own.get(vdisk.id))
            except (RTSLibError, OSError) as exc:
                problems.append(f"vdisk {vdisk.name}: {exc}")
        return objects

    def _admins_object(
        self,
        key: str,
        so: rtslib.UserBackedStorageObject,
        wanted: Wanted,
        ready: dict[int, VDisk],
        objects: dict[int, rtslib.StorageObject],
        held: set[int],
    ) -> bool:
        """An object made in targetcli: served, it is its vdisk's object (and its cfgstring bound to that vdisk, for
        restarts and targetcli's saveconfig, once LIO has it configured); bound to a vdisk that was deleted, it goes
        too (False: it is gone)."""
        config = user_config(so)
        if config is None:
            return True
        served = wanted.adopted.vdisks.get(key)
        binding = config.binding or served
        if served is not None and key not in wanted.adopted.retired:
            held.add(served[0])
            if (config.binding != served or key in wanted.adopted.unbound) and so.is_configured():
                so.set_attribute("dev_config", f"{cfgstring.SUBTYPE}/{config.bound(*served)}")
                log.info("LIO: user:%s/%s bound to vdisk %d (serial %s)", cfgstring.SUBTYPE, so.name, *served)
            vdisk = ready.get(served[0])
            if vdisk is not None and vdisk.serial == served[1]:
                if int(so.size) != vdisk.size_bytes:
                    so.set_attribute("dev_size", str(vdisk.size_bytes))
                objects[vdisk.id] = so
        elif binding is not None:
            if wanted.gone(binding):
                log.info("LIO: removing storage object %s (%s): its vdisk was deleted", so.name, so.config)
                so.delete()
                return False
            held.add(binding[0])
        return True

    def _own_object(self, vdisk: VDisk, so: rtslib.StorageObject | None) -> rtslib.StorageObject:
        if so is None:
            so = rtslib.UserBackedStorageObject(
                vdisk.name,
                config=config_of(vdisk),
                size=vdisk.size_bytes,
                wwn=vdisk.serial,
                hw_max_sectors=MAX_TRANSFER_BYTES // vdisk.block_size,
                control=f"hw_block_size={vdisk.block_size}",
            )
            log.info("LIO: storage object user:%s/%s for vdisk %s", cfgstring.SUBTYPE, vdisk.name, vdisk.id)
        elif int(so.size) != vdisk.size_bytes:
            so.set_attribute("dev_size", str(vdisk.size_bytes))
        return so

    def _tpg(self) -> rtslib.TPG:
        target = rtslib.Target(rtslib.FabricModule("iscsi"), self.target_name)
        tpg = rtslib.TPG(target, TPG_TAG)
        # open access (demo mode): every initiator sees every TPG LUN, numbered by vdisk id, read-write
        tpg.set_attribute("generate_node_acls", "1" if self.open_access else "0")
        tpg.set_attribute("demo_mode_write_protect", "0" if self.open_access else "1")
        tpg.set_attribute("authentication", "0")
        wanted = set(self.portals)
        for portal in list(tpg.network_portals):
            if (portal.ip_address, portal.port) not in wanted:
                portal.delete()
        for ip, port in self.portals:
            rtslib.NetworkPortal(tpg, ip, port)
        return tpg

    def _luns(self, tpg: rtslib.TPG, objects: dict[int, rtslib.StorageObject]) -> dict[int, rtslib.LUN]:
        """One TPG LUN per vdisk, numbered by vdisk id (initiators see the zone's LUN number, not this one)."""
        luns = {}
        for lun in list(tpg.luns):
            so = lun.storage_object
            vdisk_id = lun.lun
            if objects.get(vdisk_id) is None or objects[vdisk_id].path != so.path:
                lun.delete()
            else:
                luns[vdisk_id] = lun
        for vdisk_id, so in objects.items():
            if vdisk_id not in luns:
                luns[vdisk_id] = rtslib.LUN(tpg, vdisk_id, so)
        return luns

    def _acls(self, tpg: rtslib.TPG, wanted: Wanted, luns: dict[int, rtslib.LUN]) -> None:
        hosts = {h.id: h for h in wanted.hosts}
        by_iqn = {h.iqn: h for h in wanted.hosts}
        for acl in list(tpg.node_acls):
            if acl.node_wwn not in by_iqn:
                acl.delete()
        for host in hosts.values():
            acl = rtslib.NodeACL(tpg, host.iqn)
            acl.chap_userid = host.chap_user
            acl.chap_password = host.chap_secret
            acl.chap_mutual_userid = host.mutual_user
            acl.chap_mutual_password = host.mutual_secret
            acl.set_attribute("authentication", "1" if host.chap_user else "0")
            zones = {z.lun: z for z in wanted.zones if z.host_id == host.id and z.vdisk_id in luns}
            for mapped in list(acl.mapped_luns):
                zone = zones.get(mapped.mapped_lun)
                if zone is None or mapped.tpg_lun.lun != zone.vdisk_id:
                    mapped.delete()
                elif mapped.write_protect != zone.read_only:
                    mapped.write_protect = zone.read_only
            present = {m.mapped_lun for m in acl.mapped_luns}
            for lun, zone in sorted(zones.items()):
                if lun not in present:
                    rtslib.MappedLUN(acl, lun, luns[zone.vdisk_id], write_protect=zone.read_only)

    def remove(self) -> None:
        """Take away what san created: its target and its storage objects (on a clean exit)."""
        root = _root()
        for target in root.targets:
            if target.wwn == self.target_name:
                target.delete()
        for so in self.ours(root).values():
            so.delete()


__all__ = ["LioConfig", "LioError", "RTSLibError", "Wanted"]
