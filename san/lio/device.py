"""One LIO user-backed storage object served by san: its UIO device, the mapped command ring, and the vdisk's SCSI
unit that answers the CDBs. READ and WRITE data moves straight between the containers and the ring's data area."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import time

from san.lio._ring import Ring, RingError
from san.scsi.disk import Data, Disk, Nexus, Reply
from san.scsi.sense import CheckCondition, Key, Status, invalid_opcode

log = logging.getLogger("san.lio")

NOTIFY = b"\0\0\0\0"
MAX_DATA_OUT = 1 << 30
READS = frozenset({0x08, 0x28, 0xA8, 0x88})
# LIO checks zoning and reservations before a command reaches us and does not say which initiator sent it: every
# command comes from this one nexus, and write protection is LIO's (MappedLUN write_protect).
LIO_NEXUS = Nexus("lio")
INTERNAL_ERROR = Reply(Status.CHECK_CONDITION, sense=CheckCondition(Key.HARDWARE_ERROR, 0x44, 0x00).sense)


def map_size(minor: int) -> int:
    with open(f"/sys/class/uio/uio{minor}/maps/map0/size") as size:
        return int(size.read().strip(), 0)


class TcmuDevice:
    """A vdisk as LIO sees it: commands are fetched from the ring when the kernel signals, answered in any order."""

    def __init__(self, name: str, minor: int, disk: Disk, io_stats: bool = True) -> None:
        self.name = name
        self.minor = minor
        self.disk = disk
        self.io_stats = io_stats  # count each command in the vdisk's I/O statistics
        self.fd = os.open(f"/dev/uio{minor}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.area = mmap.mmap(self.fd, map_size(minor), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        try:
            self.ring = Ring(self.area)
        except BaseException:
            self.area.close()
            os.close(self.fd)
            raise
        self.tasks: set[asyncio.Task[None]] = set()
        self.completed = 0

    def start(self) -> None:
        """Serve: take what is already queued, then whatever the kernel signals."""
        asyncio.get_running_loop().add_reader(self.fd, self._signalled)
        self.process()

    async def stop(self) -> None:
        """Stop serving: commands still running are waited for (their answers go to the ring), then the ring goes."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=30)
        self.close()

    def close(self) -> None:
        """Let go of the device at once (the kernel has removed it, or a newer mapping replaces this one)."""
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.fd)
        for task in self.tasks:
            task.cancel()
        self.ring.release()
        with contextlib.suppress(BufferError):
            self.area.close()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1  # a late answer must not notify whatever file gets this number next

    def _signalled(self) -> None:
        try:
            os.read(self.fd, 4)
        except BlockingIOError:
            pass
        except OSError as exc:  # the device went away under us
            log.error("%s: /dev/uio%d: %s; no longer serving it", self.name, self.minor, exc)
            asyncio.get_running_loop().remove_reader(self.fd)
            return
        self.process()

    def process(self) -> None:
        """Take every new command: the fast ones are answered at once, the rest run as tasks; then one notification."""
        ring = self.ring
        memory = ring.memory
        if memory is None:
            return
        disk = self.disk
        agent = disk.agent
        volume = agent.volumes.get(disk.vdisk)
        arrived = time.monotonic_ns()  # before the fast ones are served: the rest have waited for them
        try:
            if volume is not None and disk.fast_ready(LIO_NEXUS):
                writes = disk.unit.write_cache  # with the cache off, writes go through the SCSI layer (durable)
                commands, answered = ring.serve(volume.table, agent.containers.fd_table, volume.nblocks, writes,
                                                agent.containers.dirty, self.io_stats)  # fmt: skip
                self.completed += answered
            else:
                commands = ring.fetch()
        except RingError as exc:
            log.error("%s: %s; no longer serving it (remove and re-add the storage object)", self.name, exc)
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.fd)
            return
        for cmd_id, cdb, iovs, bidi in commands:
            try:
                self._dispatch(memory, cmd_id, cdb, iovs, bidi, arrived)
            except Exception:  # one command's failure must not cost the others their answers
                log.exception("%s: command %s failed", self.name, cdb[:1].hex())
                with contextlib.suppress(Exception):
                    self._answer(cmd_id, iovs, INTERNAL_ERROR, cdb, arrived)
        ring.skip_idle()
        self._notify()

    def _dispatch(
        self, memory: memoryview, cmd_id: int, cdb: bytes, iovs: tuple[tuple[int, int], ...], bidi: int, arrived: int
    ) -> None:
        """Answer a command at once when the fast path can; otherwise start it as a task."""
        if bidi:
            self._answer(cmd_id, iovs, Reply(Status.CHECK_CONDITION, sense=invalid_opcode().sense), cdb, arrived)
            return
        buffer: memoryview | None = None
        data_out: Data = b""
        if len(iovs) == 1:
            offset, length = iovs[0]
            buffer = data_out = memory[offset : offset + length]
        elif iovs and cdb[0] not in READS:
            data_out = self.ring.gather(iovs, MAX_DATA_OUT)
        reply = self.disk.execute_now(LIO_NEXUS, cdb, data_out, buffer)
        if reply is not None:
            self._answer(cmd_id, iovs, reply, cdb, arrived)
            return
        task = asyncio.ensure_future(self._slow(cmd_id, cdb, iovs, data_out, arrived))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _slow(self, cmd_id: int, cdb: bytes, iovs: tuple[tuple[int, int], ...], data_out: Data, arrived: int) -> None:
        try:
            reply = await self.disk.execute(LIO_NEXUS, cdb, data_out)
        except Exception:
            log.exception("%s: command %s failed", self.name, cdb[:1].hex())
            reply = INTERNAL_ERROR
        self._answer(cmd_id, iovs, reply, cdb, arrived)
        self._notify()

    def _answer(self, cmd_id: int, iovs: tuple[tuple[int, int], ...], reply: Reply, cdb: bytes, arrived: int) -> None:
        read_len = -1  # only data-in sets it: for a WRITE the kernel would take it as an underflow
        data = reply.data
        if reply.status == Status.GOOD and len(data):
            in_ring = isinstance(data, memoryview) and data.obj is self.area  # a fast-path READ put it in place
            read_len = len(data) if in_ring else self.ring.scatter(iovs, memoryview(data).cast("B"))
        self.ring.complete(cmd_id, reply.status, reply.sense, read_len)
        self.completed += 1
        if self.io_stats:
            self.disk.account(cdb[0], reply, arrived, max(read_len, 0))

    def _notify(self) -> None:
        if self.completed and self.fd >= 0:
            self.completed = 0
            with contextlib.suppress(OSError):
                os.write(self.fd, NOTIFY)
