"""LIO's configuration, reconciled to the controller's with rtslib-fb: a `user:san` storage object per vdisk (san's
own, or the one an admin made in targetcli for it), one iSCSI target with a TPG and portals, and per host a NodeACL
(CHAP) with a MappedLUN per zone. Foreign objects stay; so do an admin's until their vdisk is deleted."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import rtslib
from rtslib.utils import RTSLibError

from san.lio.cfgstring import SUBTYPE, is_vdisk_id
from san.model import Host, VDisk, Zone

log = logging.getLogger("san.lio")

TPG_TAG = 1
DBROOT = "/etc/target"
MAX_TRANSFER_BYTES = 8 << 20  # as VPD B0h says (san.scsi.pages)


@dataclass
class Wanted:
    """What LIO should show: a snapshot of the controller's vdisks, hosts and zones."""

    vdisks: list[VDisk] = field(default_factory=list)
    hosts: list[Host] = field(default_factory=list)
    zones: list[Zone] = field(default_factory=list)
    adopted: dict[str, tuple[int, str]] = field(default_factory=dict)  # an admin's served object -> (vdisk, serial)
    adopting: set[str] = field(default_factory=set)  # vdisks being made for an admin's object: none of san's own


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
    return f"{SUBTYPE}/{vdisk.id}"


def object_key(so: rtslib.StorageObject) -> str:
    """`user_<hba>/<name>`: a storage object as TcmuHandler.adopted() names it."""
    return "/".join(so.path.split("/")[-2:])


class LioConfig:
    """san's part of LIO: storage objects whose config is `san/<vdisk id>` and the target named target_name."""

    def __init__(self, target_name: str, portals: list[tuple[str, int]], open_access: bool = False) -> None:
        self.target_name = target_name
        self.portals = portals
        self.open_access = open_access

    def ours(self, root: rtslib.RTSRoot, admins: bool = False) -> dict[str, rtslib.UserBackedStorageObject]:
        """san's own storage objects by config (`san/<vdisk id>`), or with admins those made in targetcli (their
        configs alike: by object_key)."""
        found = {}
        for so in root.storage_objects:
            subtype, _, config = str(so.config or "").partition("/")
            if so.plugin == "user" and subtype == SUBTYPE and is_vdisk_id(config) != admins:
                found[object_key(so) if admins else so.config] = so
        return found

    def reconcile(self, wanted: Wanted) -> None:
        """Make LIO match wanted (runs in a worker thread: enabling a device waits for the handler's answer)."""
        root = _root()
        objects = self._storage_objects(root, wanted)
        tpg = self._tpg()
        luns = self._luns(tpg, objects)
        self._acls(tpg, wanted, luns)
        tpg.enable = True

    def _storage_objects(self, root: rtslib.RTSRoot, wanted: Wanted) -> dict[int, rtslib.StorageObject]:
        """Each ready vdisk's storage object: san's own where it has one, else the one made in targetcli that san
        serves for it, else a new one of san's; the admin's go when their vdisk has gone (their device serves it)."""
        existing = self.ours(root)
        ready = {config_of(v): v for v in wanted.vdisks if v.state == "ready"}
        for config, so in existing.items():
            if config not in ready or so.name != ready[config].name:
                log.info("LIO: removing storage object %s (%s)", so.name, config)
                so.delete()
        serials = {v.id: v.serial for v in ready.values()}
        objects = {}
        unserved = set()  # names an admin's object holds that san does not serve (yet: it is taken over at start)
        for key, so in self.ours(root, admins=True).items():
            bound = wanted.adopted.get(key)
            if bound is None:
                unserved.add(so.name)
                continue
            if serials.get(bound[0]) != bound[1]:
                log.info("LIO: removing storage object %s (%s): its vdisk was deleted", so.name, so.config)
                so.delete()
            else:
                objects[bound[0]] = so
        for config, vdisk in ready.items():
            so = existing.get(config)
            if (so is None or so.name != vdisk.name) and (
                vdisk.id in objects or vdisk.name in wanted.adopting or vdisk.name in unserved
            ):
                so = objects.get(vdisk.id)  # the admin's, or none until it is served
                if so is not None and int(so.size) != vdisk.size_bytes:
                    so.set_attribute("dev_size", str(vdisk.size_bytes))
                continue
            if so is None or so.name != vdisk.name:
                so = rtslib.UserBackedStorageObject(
                    vdisk.name,
                    config=config,
                    size=vdisk.size_bytes,
                    wwn=vdisk.serial,
                    hw_max_sectors=MAX_TRANSFER_BYTES // vdisk.block_size,
                    control=f"hw_block_size={vdisk.block_size}",
                )
                log.info("LIO: storage object user:%s/%s for vdisk %s", SUBTYPE, vdisk.name, vdisk.id)
            elif int(so.size) != vdisk.size_bytes:
                so.set_attribute("dev_size", str(vdisk.size_bytes))
            objects[vdisk.id] = so
        return objects

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


__all__ = ["LioConfig", "RTSLibError", "Wanted"]
