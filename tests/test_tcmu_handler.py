"""TcmuHandler's answers to the kernel, against a fake netlink socket, fake UIO devices and a fake configfs: objects
made in targetcli answered once their vdisk is made (or refused, or shut down), bound, taken over; units retired."""

from __future__ import annotations

import asyncio
import errno
import functools
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from san.gateway.service import Gateway
from san.lio import handler as handler_module
from san.lio.cfgstring import Served
from san.lio.handler import AdoptRefused, TcmuHandler
from san.lio.netlink import ADDED_DEVICE, RECONFIG_DEVICE, REMOVED_DEVICE, DeviceEvent
from san.protocol.messages import Command, Op
from san.scsi.disk import Disk, Nexus
from san.scsi.pages import UnitInfo
from san.scsi.sense import Status


class FakeNetlink:
    """The replies the kernel would get."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, int]] = []

    def reply(self, event: DeviceEvent, status: int) -> None:
        self.replies.append((event.command, status))

    def set_features(self, kernel_replies: bool) -> None:
        pass

    def close(self) -> None:
        pass


class FakeDevice:
    """A UIO device served (no ring: nothing is mapped)."""

    def __init__(self, name: str, minor: int, disk: Disk, io_stats: bool = True) -> None:
        self.name, self.minor, self.disk = name, minor, disk

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def disk(vdisk: int, serial: str) -> Disk:
    return Disk(vdisk, None, UnitInfo(serial, 512, 131072, True))  # type: ignore[arg-type]


NAME = "tcm-user/3/vm1/san/pool=fast"


def run(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """An async test run on its own event loop (pytest sees the fixtures it asks for)."""

    @functools.wraps(test)
    def sync(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return sync


@pytest.fixture
def configfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """user_3/vm1 as rtslib leaves it before enabling: 64 MiB of 4096-byte blocks."""
    attrib = tmp_path / "user_3" / "vm1" / "attrib"
    attrib.mkdir(parents=True)
    (attrib / "dev_size").write_text(f"{64 << 20}\n")
    (attrib / "hw_block_size").write_text("4096\n")
    monkeypatch.setattr(handler_module, "CONFIGFS", str(tmp_path))
    monkeypatch.setattr(handler_module, "TcmuDevice", FakeDevice)
    return tmp_path


class Adopter:
    """adopt() as the gateway gives it: records its calls; refuses, hangs or answers as told."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, int, int]] = []

    async def __call__(self, obj: str, config: str, size: int, block_size: int) -> Disk:
        self.calls.append((obj, config, size, block_size))
        if isinstance(self.answer, Exception):
            raise self.answer
        if self.answer is None:
            await asyncio.sleep(3600)
        return self.answer  # type: ignore[no-any-return]


def made(adopter: Adopter, disk_for: Any = None) -> tuple[TcmuHandler, FakeNetlink, list[int]]:
    changes: list[int] = []
    tcmu = TcmuHandler(disk_for or (lambda obj, config: None), adopt=adopter, changed=lambda: changes.append(1))
    netlink = FakeNetlink()
    tcmu.netlink = netlink  # type: ignore[assignment]
    return tcmu, netlink, changes


async def settle(tcmu: TcmuHandler) -> None:
    for _ in range(100):
        if not tcmu.tasks:
            return
        await asyncio.sleep(0.01)


@run
async def test_an_admins_object_is_answered_once_its_vdisk_is_made(configfs: Path) -> None:
    vm1 = disk(1, "serial1")
    adopter = Adopter(vm1)
    tcmu, netlink, changes = made(adopter)
    tcmu._event(DeviceEvent(ADDED_DEVICE, 1, NAME, 0))
    assert netlink.replies == []  # the kernel waits while the vdisk is made
    await settle(tcmu)
    assert adopter.calls == [("vm1", "pool=fast", 64 << 20, 4096)]
    assert netlink.replies == [(ADDED_DEVICE, 0)] and changes
    assert tcmu.adopted() == Served({"user_3/vm1": (1, "serial1")}, unbound={"user_3/vm1"}) and tcmu.serving(1)


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (AdoptRefused("vdisk 'vm1' exists", errno.EEXIST), -errno.EEXIST),
        (AdoptRefused("no pool"), -errno.EINVAL),
        (RuntimeError("a bug"), -errno.EIO),
    ],
)
@run
async def test_a_refused_object_hears_why_and_serves_nothing(configfs: Path, answer: Exception, status: int) -> None:
    tcmu, netlink, changes = made(Adopter(answer))
    tcmu._event(DeviceEvent(ADDED_DEVICE, 1, NAME, 0))
    await settle(tcmu)
    assert netlink.replies == [(ADDED_DEVICE, status)] and tcmu.devices == {}
    assert changes  # vdisks held back while it was made may be exported now


@run
async def test_an_unreadable_size_is_refused_without_making_a_vdisk(configfs: Path) -> None:
    (configfs / "user_3" / "vm1" / "attrib" / "dev_size").write_text("lots\n")
    adopter = Adopter(disk(1, "serial1"))
    tcmu, netlink, _ = made(adopter)
    tcmu._event(DeviceEvent(ADDED_DEVICE, 1, NAME, 0))
    await settle(tcmu)
    assert netlink.replies == [(ADDED_DEVICE, -errno.EIO)] and adopter.calls == []


@run
async def test_stopping_answers_every_adoption_still_waiting(configfs: Path) -> None:
    """One waiting for its vdisk, one not started yet, and one announced once san stopped: each hears ESHUTDOWN."""
    tcmu, netlink, _ = made(Adopter(None))
    tcmu._event(DeviceEvent(ADDED_DEVICE, 1, NAME, 0))
    await asyncio.sleep(0.05)
    tcmu._event(DeviceEvent(ADDED_DEVICE, 2, "tcm-user/3/vm2/san/pool=fast", 1))
    await tcmu.stop()
    tcmu._event(DeviceEvent(ADDED_DEVICE, 3, "tcm-user/3/vm3/san/pool=fast", 2))
    assert netlink.replies == [(ADDED_DEVICE, -errno.ESHUTDOWN)] * 3


@run
async def test_the_binding_is_the_only_reconfiguration_and_renames_the_device(configfs: Path) -> None:
    tcmu, netlink, _ = made(Adopter(disk(1, "serial1")))
    tcmu._event(DeviceEvent(ADDED_DEVICE, 1, NAME, 0))
    await settle(tcmu)
    for config in ("san/pool=fast;vdisk=2;serial=serial2", "san/pool=fast;vdisk=1;serial=other", "san/3", "file/x"):
        tcmu._event(DeviceEvent(RECONFIG_DEVICE, 1, NAME, 0, config=config))
    bound = "san/pool=fast;vdisk=1;serial=serial1"
    tcmu._event(DeviceEvent(RECONFIG_DEVICE, 1, NAME, 0, config=bound))
    assert [status for _, status in netlink.replies[1:]] == [-errno.EINVAL] * 4 + [0]
    assert list(tcmu.devices) == [f"tcm-user/3/vm1/{bound}"]
    tcmu._event(DeviceEvent(REMOVED_DEVICE, 1, f"tcm-user/3/vm1/{bound}", 0))
    assert tcmu.devices == {} and netlink.replies[-1] == (REMOVED_DEVICE, 0)


@run
async def test_a_retired_unit_answers_lun_not_supported_until_its_vdisk_is_back(configfs: Path) -> None:
    """The vdisk went away (its pool offline): the device's unit is retired, refuses every command and is not
    counted as served; refresh() finds the vdisk's new unit once disk_for names one."""
    old, new = disk(1, "serial1"), disk(1, "serial1")
    found: list[Disk | None] = [None]
    tcmu, _, _ = made(Adopter(old), lambda obj, config: found[0])
    tcmu._event(DeviceEvent(ADDED_DEVICE, 1, NAME, 0))
    await settle(tcmu)
    old.retired = True
    reply = await old.execute(Nexus("lio"), bytes([0x00, 0, 0, 0, 0, 0]))
    assert reply.status == Status.CHECK_CONDITION and reply.sense[12:14] == b"\x25\x00"
    assert not old.fast_ready(Nexus("lio")) and not tcmu.serving(1)
    assert tcmu.adopted() == Served({"user_3/vm1": (1, "serial1")}, {"user_3/vm1"}, {"user_3/vm1"})
    tcmu.refresh()
    assert tcmu.devices[NAME].disk is old
    found[0] = new
    old.unit.write_cache = False  # LIO turned it off for this device: the new unit keeps it off
    tcmu.refresh()
    assert tcmu.devices[NAME].disk is new and not new.unit.write_cache and not tcmu.adopted().retired
    reused = disk(1, "serial-of-a-later-vdisk")
    new.retired, found[0] = True, reused
    tcmu.refresh()
    assert tcmu.devices[NAME].disk is new, "a device must not serve a later vdisk that took its vdisk's id"


def test_a_device_found_at_start_is_served_once_its_own_vdisk_is_here(configfs: Path) -> None:
    """Taken over at start: san's own device whose LIO serial is not the vdisk's of that id (a later vdisk took a
    deleted one's id) is not served; a device whose vdisk is not here yet waits; refresh() serves each once the
    right vdisk is there."""
    base = configfs / "user_3" / "disk0"
    (base / "action").mkdir(parents=True)
    (base / "wwn").mkdir()
    (base / "wwn" / "vpd_unit_serial").write_text("T10 VPD Unit Serial Number: serialA\n")
    (configfs / "user_3" / "vm1" / "action").mkdir()
    found: dict[str, Disk | None] = {"disk0": disk(1, "serialB"), "vm1": None}
    tcmu, _, _ = made(Adopter(None), lambda obj, config: found[obj])
    own, admins = "tcm-user/3/disk0/san/1", "tcm-user/3/vm1/san/pool=fast;vdisk=2;serial=serial2"
    tcmu._take_over(own, 0)
    tcmu._take_over(admins, 1)
    assert tcmu.devices == {} and tcmu.pending == {own: 0, admins: 1}
    assert (base / "action" / "block_dev").read_text() == "0"  # unblocked: LIO times its commands out meanwhile
    tcmu.refresh()
    assert tcmu.devices == {}
    found["disk0"], found["vm1"] = disk(1, "serialA"), disk(2, "serial2")
    tcmu.refresh()
    assert set(tcmu.devices) == {own, admins} and tcmu.pending == {}
    assert tcmu.devices[own].disk.unit.serial == "serialA"


@run
async def test_a_gateway_retires_a_vdisks_unit_before_its_table_goes() -> None:
    """DELETE_TABLE: the unit is retired before the agent drops the table, so no frontend still holding it reaches a
    table that a later vdisk with the same id gets (the Config saying the vdisk went may come after)."""
    gateway = Gateway(None, frontend="iscsi")  # type: ignore[arg-type]
    unit = gateway.disks[1] = disk(1, "serial1")
    await gateway.handle(Command(Op.CREATE_TABLE, vdisk=1, nsegments=4, segment_blocks=2048, block_size=512))
    await gateway.handle(Command(Op.DELETE_TABLE, vdisk=1, blocking=True))
    assert unit.retired and 1 not in gateway.disks and 1 not in gateway.agent.volumes
    gateway.close()
