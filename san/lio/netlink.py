"""The TCM-USER generic netlink family: the kernel announces user-backed devices (added, removed, reconfigured) on its
`config` group and waits for each answer; messages are encoded and decoded by pyroute2, the socket is the loop's."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyroute2.netlink import NLM_F_REQUEST, NLMSG_ERROR, genlmsg
from pyroute2.netlink.generic import GenericNetlinkSocket

log = logging.getLogger("san.lio")

FAMILY = "TCM-USER"
GROUP = "config"
VERSION = 2
NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1

ADDED_DEVICE = 1
REMOVED_DEVICE = 2
RECONFIG_DEVICE = 3
ADDED_DEVICE_DONE = 4
REMOVED_DEVICE_DONE = 5
RECONFIG_DEVICE_DONE = 6
SET_FEATURES = 7
DONE = {ADDED_DEVICE: ADDED_DEVICE_DONE, REMOVED_DEVICE: REMOVED_DEVICE_DONE, RECONFIG_DEVICE: RECONFIG_DEVICE_DONE}


class TcmuMessage(genlmsg):  # type: ignore[misc]
    """A TCM-USER message (include/uapi/linux/target_core_user.h, enum tcmu_genl_attr)."""

    nla_map = (
        ("TCMU_ATTR_UNSPEC", "none"),
        ("TCMU_ATTR_DEVICE", "asciiz"),
        ("TCMU_ATTR_MINOR", "uint32"),
        ("TCMU_ATTR_PAD", "none"),
        ("TCMU_ATTR_DEV_CFG", "asciiz"),
        ("TCMU_ATTR_DEV_SIZE", "uint64"),
        ("TCMU_ATTR_WRITECACHE", "uint8"),
        ("TCMU_ATTR_CMD_STATUS", "int32"),
        ("TCMU_ATTR_DEVICE_ID", "uint32"),
        ("TCMU_ATTR_SUPP_KERN_CMD_REPLY", "uint8"),
    )


@dataclass
class DeviceEvent:
    """One announcement: which device (its UIO name and minor) and, for RECONFIG, what changed."""

    command: int
    device_id: int
    name: str = ""
    minor: int = -1
    config: str | None = None
    size: int | None = None
    write_cache: bool | None = None


def _discover() -> tuple[int, int]:
    """The family's id and its config group's id (pyroute2 asks the generic netlink controller)."""
    probe = GenericNetlinkSocket()
    try:
        probe.bind(FAMILY, TcmuMessage)
        return int(probe.prid), int(probe.mcast_groups[GROUP])
    finally:
        probe.close()


class TcmuNetlink:
    """A socket joined to TCM-USER's config group; events go to on_event, answers go back with reply()."""

    def __init__(self, on_event: Callable[[DeviceEvent], None]) -> None:
        self.on_event = on_event
        self.family = 0
        self.sock: socket.socket | None = None

    async def open(self) -> None:
        """Find the family (target_core_user must be loaded), join its group, start listening on the loop."""
        self.family, group = await asyncio.to_thread(_discover)
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        sock.setblocking(False)
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def set_features(self, kernel_replies: bool) -> None:
        """Tell the kernel whether it may wait for our answers to its announcements."""
        self._send(SET_FEATURES, [("TCMU_ATTR_SUPP_KERN_CMD_REPLY", int(kernel_replies))])

    def reply(self, event: DeviceEvent, status: int) -> None:
        """Answer an announcement: 0, or a negative errno that the kernel passes on to whoever configured it."""
        self._send(DONE[event.command], [("TCMU_ATTR_CMD_STATUS", status), ("TCMU_ATTR_DEVICE_ID", event.device_id)])

    def _send(self, command: int, attrs: list[tuple[str, int]]) -> None:
        if self.sock is None:
            return
        msg = TcmuMessage()
        msg["cmd"] = command
        msg["version"] = VERSION
        msg["attrs"] = attrs
        msg["header"]["type"] = self.family
        msg["header"]["flags"] = NLM_F_REQUEST
        msg.encode()
        self.sock.send(msg.data)

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("TCM-USER netlink: %s", exc)
                return
            for event in self._parse(data):
                self.on_event(event)

    def _parse(self, data: bytes) -> list[DeviceEvent]:
        events = []
        at = 0
        while at + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, at)
            if length < 16:
                break
            chunk = data[at : at + length]
            at += (length + 3) & ~3
            if kind == NLMSG_ERROR:
                code = struct.unpack_from("=i", chunk, 16)[0] if len(chunk) >= 20 else 0
                if code:
                    log.error("TCM-USER netlink: the kernel refused a message: errno %d", -code)
                continue
            if kind != self.family:
                continue
            msg = TcmuMessage(chunk)
            msg.decode()
            command = msg["cmd"]
            if command not in DONE:
                continue
            cache = msg.get_attr("TCMU_ATTR_WRITECACHE")
            events.append(
                DeviceEvent(
                    command,
                    msg.get_attr("TCMU_ATTR_DEVICE_ID") or 0,
                    msg.get_attr("TCMU_ATTR_DEVICE") or "",
                    msg.get_attr("TCMU_ATTR_MINOR", -1),
                    msg.get_attr("TCMU_ATTR_DEV_CFG"),
                    msg.get_attr("TCMU_ATTR_DEV_SIZE"),
                    None if cache is None else bool(cache),
                )
            )
        return events
