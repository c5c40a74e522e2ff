"""The TCMU handler for subtype `san`: answers every device announcement of the kernel (which waits for it) and serves
each device's ring; it starts as tcmu-runner does (netlink blocked, existing devices taken over, unblocked)."""

from __future__ import annotations

import asyncio
import errno
import glob
import logging
import os
from collections.abc import Callable

from san.lio.device import TcmuDevice
from san.lio.netlink import ADDED_DEVICE, RECONFIG_DEVICE, REMOVED_DEVICE, DeviceEvent, TcmuNetlink
from san.scsi.disk import Disk
from san.scsi.sense import UnitAttention

log = logging.getLogger("san.lio")

SUBTYPE = "san"
CONFIGFS = "/sys/kernel/config/target/core"
MODULE_PARAMETERS = "/sys/module/target_core_user/parameters"


def parse_name(name: str) -> tuple[str, str, str] | None:
    """A UIO device name `tcm-user/<hba>/<object>/<subtype>/<config>` as (hba, object, config) for our subtype."""
    parts = name.split("/", 4)
    if len(parts) != 5 or parts[0] != "tcm-user" or parts[3] != SUBTYPE:
        return None
    return parts[1], parts[2], parts[4]


def _write(path: str, value: str) -> None:
    with open(path, "w") as attribute:
        attribute.write(value)


class TcmuHandler:
    """Devices of subtype `san`, each bound to the SCSI unit that `disk_for(config)` names (None: refuse it)."""

    def __init__(self, disk_for: Callable[[str], Disk | None], io_stats: bool = True) -> None:
        self.disk_for = disk_for
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

    def _attach(self, name: str, minor: int) -> int:
        """Serve a device; 0 or a negative errno for the kernel."""
        parsed = parse_name(name)
        if parsed is None:
            return -errno.EINVAL
        disk = self.disk_for(parsed[2])
        if disk is None:
            log.error("%s: no vdisk with id %r", name, parsed[2])
            return -errno.ENOENT
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
        return 0

    def _event(self, event: DeviceEvent) -> None:
        """Answer every announcement for our subtype, whatever happens (the kernel, and whoever wrote to configfs,
        wait for the answer)."""
        if parse_name(event.name) is None:
            return  # another handler's device: its handler answers
        status = -errno.EIO
        try:
            if event.command == ADDED_DEVICE:
                status = self._attach(event.name, event.minor)
            elif event.command == REMOVED_DEVICE:
                device = self.devices.pop(event.name, None)
                if device is not None:
                    device.close()
                    log.info("%s removed", event.name)
                status = 0
            elif event.command == RECONFIG_DEVICE:
                status = self._reconfigure(event)
                if status == 0 and event.write_cache is False:
                    task = asyncio.ensure_future(self._cache_off(event))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
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
