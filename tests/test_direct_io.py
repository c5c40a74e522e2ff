"""Direct I/O for containers shared by gateways on several hosts: no page cache of this host serves stale data.

Two hosts on one disk are played by a loop device over a file: the loop device has a page cache of its own, so a
write to the file behind it is what another host's write to a shared disk is to this one. A gateway reading the
device through its page cache sees the old bytes; with direct I/O (the default for block devices) it sees the new."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopdev import loop_device

from san._fastmap import ZERO
from san.agent._blockio import DIRECT
from san.agent.agent import Agent
from san.protocol.messages import Action, Command, Op, Response
from san.storage.containers import ContainerError, ContainerSet
from san.storage.label import Label, new_id, write_label

MIB = 1 << 20
SEGMENT_BLOCKS = 2048  # 1 MiB segments of 512-byte blocks


class FakeController:
    """Every entry is loaded already; nothing is asked."""

    async def send(self, message: object) -> Response:
        raise AssertionError(f"unexpected {message}")


@pytest.fixture
def shared_disk(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A file and a loop device over it: (the file, the device)."""
    backing = tmp_path / "shared.img"
    backing.write_bytes(b"\x11" * (16 * MIB))
    with loop_device(backing) as device:
        yield backing, device


def _cached(path: Path | str, offset: int, length: int) -> bool:
    """Whether [offset, offset+length) of path is in this host's page cache (a read that may not block)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(length)], offset, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _other_host_writes(backing: Path, offset: int, data: bytes) -> None:
    fd = os.open(backing, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fdatasync(fd)
    finally:
        os.close(fd)


async def _agent_on(device: str, direct_io: str) -> Agent:
    agent = Agent(FakeController(), direct_io)
    await agent.handle(Command(Op.ATTACH_CONTAINER, container=1, path=device))
    blocks = 8 * SEGMENT_BLOCKS
    create = Command(Op.CREATE_TABLE, vdisk=1, nsegments=8, segment_blocks=SEGMENT_BLOCKS, block_size=512, nblocks=blocks)
    await agent.handle(create)
    table = agent.volumes[1].table
    table.set_entries(0, [(1, segment, 0) for segment in range(8)])  # segment n -> container segment n, writable
    assert table.get_entries(0, 1)[0][2] != ZERO
    return agent


@pytest.mark.parametrize("direct_io", ["auto", "off"])
def test_a_write_by_another_host_is_read_through_direct_io(shared_disk: tuple[Path, str], direct_io: str) -> None:
    backing, device = shared_disk

    async def body() -> bytes:
        agent = await _agent_on(device, direct_io)
        try:
            assert bool(agent.containers.fd_table[1] & DIRECT) == (direct_io == "auto"), "auto: a block device is direct"
            assert bytes(await agent.read(1, 8, 8)) == b"\x11" * 4096
            _other_host_writes(backing, 4096, b"\x22" * 4096)
            return bytes(await agent.read(1, 8, 8))
        finally:
            agent.close()

    seen = asyncio.run(body())
    if direct_io == "auto":
        assert seen == b"\x22" * 4096, "direct I/O reads what the other host wrote"
    else:  # the control: this setup really has a page cache that goes stale
        assert seen == b"\x11" * 4096, "buffered, the device's page cache still holds the old bytes"


def test_a_direct_write_reaches_the_shared_disk_before_it_is_acknowledged(shared_disk: tuple[Path, str]) -> None:
    """Through the Cython path (unaligned iSCSI-like buffers, so through a bounce buffer) and the Python one, each in a
    thread: the file behind the device holds the data once the write returns, and this host's cache of the device
    holds none of it."""
    backing, device = shared_disk

    async def body() -> None:
        agent = await _agent_on(device, "auto")
        try:
            data = bytearray(b"\x00" + b"\x33" * 8192)
            assert not agent.write_now(1, 16, memoryview(data)[1:]), "never on the event loop: it waits for the device"
            await agent.write(1, 16, memoryview(data)[1:])  # every block mapped: in a thread, through a bounce buffer
            await agent.write(1, 3 * SEGMENT_BLOCKS - 8, b"\x44" * 8192)  # across segments 2 and 3
            with backing.open("rb") as behind:
                behind.seek(16 * 512)
                assert behind.read(8192) == b"\x33" * 8192
                behind.seek(3 * MIB - 4096)
                assert behind.read(8192) == b"\x44" * 8192
            assert not _cached(device, 16 * 512, 8192), "no page of the device cached on this host"
            assert bytes(await agent.read(1, 3 * SEGMENT_BLOCKS - 8, 16)) == b"\x44" * 8192
        finally:
            agent.close()

    asyncio.run(body())


def test_direct_containers_move_any_buffer_and_refuse_unaligned_offsets(tmp_path: Path) -> None:
    path = tmp_path / "c.img"
    path.write_bytes(bytes(8 * MIB))
    containers = ContainerSet()
    try:
        containers.attach(1, str(path))
        assert containers.set_direct(1) in (512, 4096)
        assert fcntl.fcntl(containers.fd(1), fcntl.F_GETFL) & os.O_DIRECT
        big = bytearray(os.urandom(3 * MIB + 1))
        containers.write_from(1, 512, memoryview(big)[1:])  # unaligned memory, more than one bounce buffer
        back = bytearray(3 * MIB + 3)
        containers.read_into(1, 512, memoryview(back)[3:])
        assert back[3:] == big[1:]
        with pytest.raises(ContainerError, match="ends before"):
            containers.read_into(1, 8 * MIB - 512, memoryview(bytearray(1024)))
        with pytest.raises(OSError):
            containers.read_into(1, 100, memoryview(bytearray(512)))  # not on a sector boundary: refused, not bent
    finally:
        containers.close()


def test_a_direct_container_attached_again_keeps_its_label_check(tmp_path: Path) -> None:
    """A gateway that registers again is sent every ATTACH_CONTAINER again: the label of a container it already
    holds with O_DIRECT is read through an aligned buffer, so the container stays (it used to fail every other time)."""
    path = tmp_path / "pool.img"
    path.write_bytes(bytes(8 * MIB))
    one = new_id()
    fd = os.open(path, os.O_RDWR)
    try:
        write_label(fd, Label(new_id(), one, new_id(), 1, 1, MIB, 8, "p"))
    finally:
        os.close(fd)

    async def body() -> None:
        agent = Agent(FakeController(), "on")
        attach = Command(Op.ATTACH_CONTAINER, container=1, path=str(path), uuid=one)
        try:
            for _ in range(3):
                assert (await agent.handle(attach)).action is Action.OK
                assert agent.containers.fd_table[1] & DIRECT
            wrong = Command(Op.ATTACH_CONTAINER, container=1, path=str(path), uuid=new_id())
            assert (await agent.handle(wrong)).action is Action.FAIL, "another container's label is still refused"
        finally:
            agent.close()

    asyncio.run(body())
