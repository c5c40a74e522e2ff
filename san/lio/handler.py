"""The TCMU handler for subtype `san`: answers every device announcement of the kernel (which waits for it) and serves
each device's ring; it starts as tcmu-runner does (netlink blocked, existing devices taken over, unblocked)."""

from __future__ import annotations

import asyncio
import errno
import glob
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from san.lio import cfgstring
from san.lio.cfgstring import SUBTYPE, Served, is_vdisk_id
from san.lio.device import TcmuDevice
from san.lio.netlink import ADDED_DEVICE, RECONFIG_DEVICE, REMOVED_DEVICE, DeviceEvent, TcmuNetlink
from san.model import shown
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
Adopt = Callable[[str, str, int, int], Awaitable[Disk]]  # (storage object, cfgstring, size, block size) -> its unit


def _write(path: str, value: str) -> None:
    with open(path, "w") as attribute:
        attribute.write(value)


class TcmuHandler:
    """Devices of subtype `san`, each bound to the SCSI unit that `disk_for(object, config)` names when it is taken
    over or added; a new device with a cfgstring gets the unit `adopt` finds or makes (without adopt it is refused);
    `changed` hears when such a device is served and when any device goes. A unit retired under a device (its vdisk
    went) answers LOGICAL UNIT NOT SUPPORTED until refresh() finds the device's vdisk again."""

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
        self.pending: dict[str, int] = {}  # devices found at start whose vdisk is not here yet: name -> UIO minor
        self.tasks: set[asyncio.Task[None]] = set()
        self.answered: set[int] = set()  # ids of the events in tasks that have had their answer
        self.stopping = False
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
        handler takes them over). Adoptions still waiting are cancelled, and new ones refused: the kernel hears
        ESHUTDOWN."""
        self.stopping = True
        while self.tasks:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.wait(list(self.tasks))
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
                if self._attach(name, minor, self._serial_of(hba, obj)):
                    self.pending[name] = minor  # served once its vdisk is here (refresh)
            finally:
                _write(os.path.join(actions, "block_dev"), "0")
        except OSError as exc:
            log.error("cannot take over %s: %s", name, exc)

    def adopted(self) -> Served:
        """The devices made in targetcli, the vdisks they serve, and how."""
        served = Served()
        for name, device in self.devices.items():
            parsed = parse_name(name)
            if parsed is not None and not is_vdisk_id(parsed[2]):
                key = f"user_{parsed[0]}/{parsed[1]}"
                served.vdisks[key] = (device.disk.vdisk, device.disk.unit.serial)
                if device.disk.retired:
                    served.retired.add(key)
                try:
                    if cfgstring.parse(parsed[2]).binding is None:
                        served.unbound.add(key)
                except cfgstring.CfgStringError:
                    served.unbound.add(key)
        return served

    def serving(self, vdisk: int) -> bool:
        """Whether a device serves this vdisk now."""
        return any(d.disk.vdisk == vdisk and not d.disk.retired for d in self.devices.values())

    def refresh(self) -> None:
        """Each device whose unit was retired serves its vdisk's new unit (the same vdisk: id and serial) once
        disk_for finds one; a device found at start whose vdisk was not here is served once it is."""
        for name, device in self.devices.items():
            parsed = parse_name(name)
            if parsed is not None and device.disk.retired:
                disk = self.disk_for(parsed[1], parsed[2])
                if disk is not None and not disk.retired and disk.unit.serial == device.disk.unit.serial:
                    disk.unit.write_cache = device.disk.unit.write_cache  # as LIO last set it for this device
                    device.disk = disk
                    log.info("%s serves vdisk %d again", shown(name, 300), disk.vdisk)
        for name, minor in list(self.pending.items()):
            parsed = parse_name(name)
            if parsed is None or self._attach(name, minor, self._serial_of(parsed[0], parsed[1]), quiet=True) == 0:
                del self.pending[name]

    def _serial_of(self, hba: str, obj: str) -> str | None:
        """The unit serial LIO has for a storage object (san sets its own objects' to their vdisk's)."""
        try:
            with open(os.path.join(CONFIGFS, f"user_{hba}", obj, "wwn", "vpd_unit_serial")) as wwn:
                return wwn.read().partition(":")[2].strip() or None
        except OSError:
            return None

    def _attach(self, name: str, minor: int, serial: str | None = None, quiet: bool = False) -> int:
        """Serve a device; 0 or a negative errno for the kernel. One of san's own whose LIO serial is given must
        have its vdisk's (a later vdisk may have the id of a deleted one)."""
        parsed = parse_name(name)
        if parsed is None:
            return -errno.EINVAL
        disk = self.disk_for(parsed[1], parsed[2])
        if disk is not None and is_vdisk_id(parsed[2]) and serial is not None and serial != disk.unit.serial:
            if not quiet:
                log.error("%s: serial %s is not vdisk %d's: not served", shown(name, 300), shown(serial), disk.vdisk)
            return -errno.ENOENT
        if disk is None:
            if not quiet:
                log.error("%s: its vdisk is not here (deleted, or not ready yet)", shown(name, 300))
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
        """A new storage object's size and block size, as rtslib wrote them (attrib dev_size, hw_block_size)."""
        attrib = os.path.join(CONFIGFS, f"user_{hba}", obj, "attrib")
        try:
            with open(os.path.join(attrib, "dev_size")) as size, open(os.path.join(attrib, "hw_block_size")) as block:
                return int(size.read()), int(block.read())
        except (OSError, ValueError) as exc:
            raise AdoptRefused(f"cannot read its size and block size: {exc}", errno.EIO) from None

    async def _adopt(self, event: DeviceEvent) -> None:
        """A device made in targetcli: its vdisk is found or made (or it is refused), then the kernel hears the
        answer, whatever happens (ESHUTDOWN when san stops first)."""
        parsed = parse_name(event.name)
        assert parsed is not None and self.adopt is not None
        hba, obj, config = parsed
        status = -errno.EIO
        try:
            size, block_size = self._geometry(hba, obj)
            disk = await self.adopt(obj, config, size, block_size)
            status = self._serve(event.name, event.minor, disk)
        except AdoptRefused as exc:
            log.error("%s (cfgstring %s) refused: %s", shown(f"user:{SUBTYPE}/{obj}"), shown(config, 200), exc)
            status = -exc.errno
        except asyncio.CancelledError:
            status = -errno.ESHUTDOWN
            raise
        except Exception:
            log.exception("%s: making its vdisk failed", shown(f"user:{SUBTYPE}/{obj}"))
        finally:
            self._reply(event, status)
            if status and self.changed is not None:
                self.changed()  # vdisks held back for it may get san's own objects now

    def _reply(self, event: DeviceEvent, status: int) -> None:
        self.answered.add(id(event))
        self.netlink.reply(event, status)

    def _spawn(self, event: DeviceEvent, work: Coroutine[Any, Any, None]) -> None:
        """Answer event in a task; cancelled before it answers (san stops), the kernel hears ESHUTDOWN."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self.tasks.discard(task)
            if id(event) not in self.answered:
                self.netlink.reply(event, -errno.ESHUTDOWN)
            self.answered.discard(id(event))

        task.add_done_callback(done)

    def _event(self, event: DeviceEvent) -> None:
        """Answer every announcement for our subtype, whatever happens (the kernel, and whoever wrote to configfs,
        wait for the answer)."""
        parsed = parse_name(event.name)
        if parsed is None:
            return  # another handler's device: its handler answers
        status = -errno.EIO
        try:
            if self.stopping and event.command != REMOVED_DEVICE:
                status = -errno.ESHUTDOWN
            elif event.command == ADDED_DEVICE:
                if not is_vdisk_id(parsed[2]) and self.adopt is not None:
                    self._spawn(event, self._adopt(event))
                    return  # answered once its vdisk is made
                status = self._attach(event.name, event.minor)
            elif event.command == REMOVED_DEVICE:
                self.pending.pop(event.name, None)
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
                    self._spawn(event, self._cache_off(event))
                    return  # answered once what was written back is durable
        except Exception:
            log.exception("%s: handling netlink command %d failed", event.name, event.command)
        self.netlink.reply(event, status)

    async def _cache_off(self, event: DeviceEvent) -> None:
        """The write cache goes off: what it acknowledged is made durable before the kernel hears the change."""
        device = self.devices.get(event.name)
        status = -errno.EIO
        try:
            if device is not None:
                await device.disk.agent.flush()
                device.disk.unit.write_cache = False
            status = 0
        except asyncio.CancelledError:
            status = -errno.ESHUTDOWN
            raise
        except Exception:
            log.exception("%s: flush before turning the write cache off failed", event.name)
        finally:
            self._reply(event, status)

    def _reconfigure(self, event: DeviceEvent) -> int:
        device = self.devices.get(event.name)
        if device is None:
            return -errno.ENODEV
        disk = device.disk
        if event.config is not None and event.config != event.name.split("/", 3)[3]:
            return self._rebind(event.name, event.config)
        if event.size is not None:
            if event.size != disk.nblocks * disk.block_size:
                log.error("%s: LIO size %d is not the vdisk's %d; grow the vdisk with san instead", event.name,
                          event.size, disk.nblocks * disk.block_size)  # fmt: skip
                return -errno.EINVAL
            disk.raise_attention(UnitAttention.CAPACITY_CHANGED)
        if event.write_cache:
            disk.unit.write_cache = True
        return 0

    def _rebind(self, name: str, config: str) -> int:
        """A new dev_config for a device: only the binding of a device made in targetcli to the vdisk it serves (san
        writes it); a device cannot be pointed at another vdisk while it serves."""
        device = self.devices[name]
        try:
            binding = cfgstring.parse(cfgstring.of_device(config)).binding
        except cfgstring.CfgStringError as exc:
            log.error("%s: dev_config %s refused: %s", shown(name, 300), shown(config), exc)
            return -errno.EINVAL
        if binding != (device.disk.vdisk, device.disk.unit.serial) or device.disk.retired:
            log.error("%s: dev_config %s refused: it serves vdisk %d", shown(name, 300), shown(config), device.disk.vdisk)
            return -errno.EINVAL
        new_name = "/".join([*name.split("/", 3)[:3], config])  # what the kernel names the UIO device after this
        device.name = new_name
        self.devices[new_name] = self.devices.pop(name)
        log.info("%s bound to vdisk %d", shown(new_name, 300), binding[0])
        return 0
