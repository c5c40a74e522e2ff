"""The TCMU handler for subtype `san`: answers every device announcement of the kernel (which waits for it) and serves
each device's ring; it starts as tcmu-runner does (netlink blocked, existing devices taken over, unblocked).

A device san made names its vdisk (`san/<vdisk id>`); one an admin made in targetcli names a pool (`san/pool=fast`),
and its vdisk is made before the kernel hears the answer."""

from __future__ import annotations

import asyncio
import errno
import glob
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from san.lio.cfgstring import SUBTYPE, is_vdisk_id
from san.lio.device import TcmuDevice
from san.lio.netlink import ADDED_DEVICE, RECONFIG_DEVICE, REMOVED_DEVICE, DeviceEvent, TcmuNetlink
from san.scsi.disk import Disk
from san.scsi.sense import UnitAttention

log = logging.getLogger("san.lio")

CONFIGFS = "/sys/kernel/config/target/core"
MODULE_PARAMETERS = "/sys/module/target_core_user/parameters"


def parse_name(name: str) -> tuple[str, str, str] | None:
    """A UIO device name `tcm-user/<hba>/<object>/<subtype>/<config>` as (hba, object, config) for our subtype."""
    parts = name.split("/", 4)
    if len(parts) != 5 or parts[0] != "tcm-user" or parts[3] != SUBTYPE:
        return None
    return parts[1], parts[2], parts[4]


class AdoptRefused(Exception):
    """A storage object made in targetcli gets no vdisk; the message says why, errno is what the kernel hears."""

    def __init__(self, message: str, code: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = code


DiskFor = Callable[[str, str], Disk | None]  # (storage object, config) -> the unit it serves, None: refuse it
Adopt = Callable[[str, str, int, int], Awaitable[Disk]]  # (storage object, cfgstring, size, block size) -> a new unit


def _write(path: str, value: str) -> None:
    with open(path, "w") as attribute:
        attribute.write(value)


class TcmuHandler:
    """Devices of subtype `san`, each bound to the SCSI unit that `disk_for(object, config)` names when it is taken
    over or added; a new device with a cfgstring gets the unit `adopt` makes (without adopt it is refused);
    `changed` hears when such a device is served and when any device goes."""

    def __init__(
        self,
        disk_for: DiskFor,
        io_stats: bool = True,
        adopt: Adopt | None = None,
        changed: Callable[[], None] | None = None,
    ) -> None:
        self.disk_for = disk_for
        self.adopt = adopt
        self.changed = changed
        self.io_stats = io_stats  # count each command in its vdisk's I/O statistics
        self.devices: dict[str, TcmuDevice] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.netlink = TcmuNetlink(self._event)

    async def start(self) -> None:
        self._parameter("block_netlink", "1")
        try:
            self._parameter("reset_netlink", "1")
            await self.netlink.open()
            self.netlink.set_features(kernel_replies=True)
            for path in sorted(glob.glob("/sys/class/uio/uio*/name")):
                with open(path) as name_file:
                    name = name_file.read().strip()
                minor = int(os.path.basename(os.path.dirname(path)).removeprefix("uio"))
                if parse_name(name) is not None:
                    self._take_over(name, minor)
        finally:
            self._parameter("block_netlink", "0")

    async def stop(self) -> None:
        """Turn kernel replies off and let go of every device still there (after a kill, LIO keeps them and the next
        handler takes them over)."""
        self.netlink.set_features(kernel_replies=False)
        self.netlink.close()
        for device in list(self.devices.values()):
            await device.stop()
        self.devices.clear()

    def _parameter(self, name: str, value: str) -> None:
        path = os.path.join(MODULE_PARAMETERS, name)
        if os.path.exists(path):
            _write(path, value)

    def _take_over(self, name: str, minor: int) -> None:
        """A device that existed before we started: block it, reset its ring (what was in flight fails with BUSY and
        the initiator retries it), serve it, unblock it."""
        parsed = parse_name(name)
        assert parsed is not None
        hba, obj, _ = parsed
        actions = os.path.join(CONFIGFS, f"user_{hba}", obj, "action")
        try:
            _write(os.path.join(actions, "block_dev"), "1")
            try:
                _write(os.path.join(actions, "reset_ring"), "1")
                self._attach(name, minor)
            finally:
                _write(os.path.join(actions, "block_dev"), "0")
        except OSError as exc:
            log.error("cannot take over %s: %s", name, exc)

    def adopted(self) -> dict[str, tuple[int, str]]:
        """The devices made in targetcli that are served: `user_<hba>/<object>` -> (vdisk id, serial)."""
        found = {}
        for name, device in self.devices.items():
            parsed = parse_name(name)
            if parsed is not None and not is_vdisk_id(parsed[2]):
                found[f"user_{parsed[0]}/{parsed[1]}"] = (device.disk.vdisk, device.disk.unit.serial)
        return found

    def _attach(self, name: str, minor: int) -> int:
        """Serve a device; 0 or a negative errno for the kernel."""
        parsed = parse_name(name)
        if parsed is None:
            return -errno.EINVAL
        disk = self.disk_for(parsed[1], parsed[2])
        if disk is None:
            what = "id" if is_vdisk_id(parsed[2]) else "name"
            log.error("%s: no vdisk with %s %r", name, what, parsed[2] if what == "id" else parsed[1])
            return -errno.ENOENT
        return self._serve(name, minor, disk)

    def _serve(self, name: str, minor: int, disk: Disk) -> int:
        old = self.devices.pop(name, None)
        if old is not None:
            old.close()
        try:
            device = TcmuDevice(name, minor, disk, self.io_stats)
        except Exception as exc:
            log.error("%s: cannot map /dev/uio%d: %s", name, minor, exc)
            return -errno.EIO
        self.devices[name] = device
        device.start()
        log.info("serving %s on /dev/uio%d", name, minor)
        parsed = parse_name(name)
        if self.changed is not None and parsed is not None and not is_vdisk_id(parsed[2]):
            self.changed()  # the vdisk's LUN is this object now
        return 0

    def _geometry(self, hba: str, obj: str) -> tuple[int, int]:
        """A new storage object's size and block size, as rtslib wrote them (dev_size, control hw_block_size)."""
        base = os.path.join(CONFIGFS, f"user_{hba}", obj)
        with open(os.path.join(base, "info")) as info:
            fields = info.read().split()
        size = int(fields[fields.index("Size:") + 1])
        with open(os.path.join(base, "attrib", "hw_block_size")) as block_size:
            return size, int(block_size.read())

    async def _adopt(self, event: DeviceEvent) -> None:
        """A device made in targetcli: its vdisk is made (or it is refused), then the kernel hears the answer."""
        parsed = parse_name(event.name)
        assert parsed is not None and self.adopt is not None
        hba, obj, config = parsed
        status = -errno.EIO
        try:
            size, block_size = self._geometry(hba, obj)
            disk = await self.adopt(obj, config, size, block_size)
            status = self._serve(event.name, event.minor, disk)
        except AdoptRefused as exc:
            log.error("user:%s/%s (cfgstring %r) refused: %s", SUBTYPE, obj, config, exc)
            status = -exc.errno
        except (OSError, ValueError) as exc:
            log.error("user:%s/%s: cannot read its size and block size: %s", SUBTYPE, obj, exc)
        except Exception:
            log.exception("user:%s/%s: making its vdisk failed", SUBTYPE, obj)
        self.netlink.reply(event, status)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _event(self, event: DeviceEvent) -> None:
        """Answer every announcement for our subtype, whatever happens (the kernel, and whoever wrote to configfs,
        wait for the answer)."""
        if parse_name(event.name) is None:
            return  # another handler's device: its handler answers
        status = -errno.EIO
        try:
            if event.command == ADDED_DEVICE:
                config = event.name.split("/", 4)[4]
                if not is_vdisk_id(config) and self.adopt is not None:
                    self._spawn(self._adopt(event))
                    return  # answered once its vdisk is made
                status = self._attach(event.name, event.minor)
            elif event.command == REMOVED_DEVICE:
                device = self.devices.pop(event.name, None)
                if device is not None:
                    device.close()
                    log.info("%s removed", event.name)
                if self.changed is not None:
                    self.changed()  # san's own object deleted by hand comes back; an admin's no longer holds its vdisk
                status = 0
            elif event.command == RECONFIG_DEVICE:
                status = self._reconfigure(event)
                if status == 0 and event.write_cache is False:
                    self._spawn(self._cache_off(event))
                    return  # answered once what was written back is durable
        except Exception:
            log.exception("%s: handling netlink command %d failed", event.name, event.command)
        self.netlink.reply(event, status)

    async def _cache_off(self, event: DeviceEvent) -> None:
        """The write cache goes off: what it acknowledged is made durable before the kernel hears the change."""
        device = self.devices.get(event.name)
        status = 0
        try:
            if device is not None:
                await device.disk.agent.flush()
                device.disk.unit.write_cache = False
        except Exception:
            log.exception("%s: flush before turning the write cache off failed", event.name)
            status = -errno.EIO
        self.netlink.reply(event, status)

    def _reconfigure(self, event: DeviceEvent) -> int:
        device = self.devices.get(event.name)
        if device is None:
            return -errno.ENODEV
        disk = device.disk
        if event.config is not None and event.config != event.name.split("/", 3)[3]:
            return -errno.EINVAL  # a device cannot be pointed at another vdisk while it serves
        if event.size is not None:
            if event.size != disk.nblocks * disk.block_size:
                log.error("%s: LIO size %d is not the vdisk's %d; grow the vdisk with san instead", event.name,
                          event.size, disk.nblocks * disk.block_size)  # fmt: skip
                return -errno.EINVAL
            disk.raise_attention(UnitAttention.CAPACITY_CHANGED)
        if event.write_cache:
            disk.unit.write_cache = True
        return 0
