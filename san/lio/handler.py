"""The TCMU handler for subtype `san`: answers the kernel's device announcements and serves each device's ring.

Start-up follows tcmu-runner: block netlink, take over the devices that already exist (resetting their rings), unblock;
a clean stop turns kernel replies off again so that configfs never waits for a handler that has gone."""

from __future__ import annotations

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

    def __init__(self, disk_for: Callable[[str], Disk | None]) -> None:
        self.disk_for = disk_for
        self.devices: dict[str, TcmuDevice] = {}
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
        """Turn kernel replies off and let go of every device (LIO keeps them; a new handler takes them over)."""
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
            device = TcmuDevice(name, minor, disk)
        except (OSError, ValueError) as exc:
            log.error("%s: cannot map /dev/uio%d: %s", name, minor, exc)
            return -errno.EIO
        self.devices[name] = device
        device.start()
        log.info("serving %s on /dev/uio%d", name, minor)
        return 0

    def _event(self, event: DeviceEvent) -> None:
        if parse_name(event.name) is None:
            return  # another handler's device: its handler answers
        status = 0
        if event.command == ADDED_DEVICE:
            status = self._attach(event.name, event.minor)
        elif event.command == REMOVED_DEVICE:
            device = self.devices.pop(event.name, None)
            if device is not None:
                device.close()
                log.info("%s removed", event.name)
        elif event.command == RECONFIG_DEVICE:
            status = self._reconfigure(event)
        self.netlink.reply(event, status)

    def _reconfigure(self, event: DeviceEvent) -> int:
        device = self.devices.get(event.name)
        if device is None:
            return -errno.ENODEV
        disk = device.disk
        if event.config is not None:
            parsed = parse_name(f"tcm-user/0/x/{event.config}")
            if parsed is None or self.disk_for(parsed[2]) is not disk:
                return -errno.EINVAL  # a device cannot be pointed at another vdisk while it serves
        if event.size is not None:
            if event.size != disk.nblocks * disk.block_size:
                log.warning("%s: LIO size %d differs from the vdisk's %d", event.name, event.size,
                            disk.nblocks * disk.block_size)  # fmt: skip
            disk.raise_attention(UnitAttention.CAPACITY_CHANGED)
        if event.write_cache is not None:
            disk.unit.write_cache = event.write_cache
        return 0
