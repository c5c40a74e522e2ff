"""The TCMU ring walker (san/lio/_ring.pyx) on an area laid out as the kernel does: PAD, TMR, wrap-around, out-of-order
answers at cmd_tail, corrupt entries refused, and serve() against a real agent (the kernel side: tests/test_lio.py)."""

from __future__ import annotations

import asyncio
import mmap
import struct
from pathlib import Path

import pytest

from san._fastmap import READ_IO, WRITE_IO
from san.lio._ring import CMD, PAD, TMR, Ring, RingError
from san.model import MIB
from san.service import Service

CMDR_OFF = 128
CMDR_SIZE = 4096
DATA_OFF = CMDR_OFF + CMDR_SIZE
AREA = DATA_OFF + 64 * 4096
OOOC, READ_LEN = 1, 2
ENTRY_SIZE = 128  # the kernel never makes a command entry smaller than struct tcmu_cmd_entry (112 bytes)


class KernelSide:
    """Plays the kernel: queues entries at cmd_head and reads completions between its tail and cmd_tail."""

    def __init__(self, flags: int = OOOC | READ_LEN) -> None:
        self.area = mmap.mmap(-1, AREA)
        struct.pack_into("=HHIII", self.area, 0, 2, flags, CMDR_OFF, CMDR_SIZE, 0)
        self.head = 0
        self.seen_tail = 0

    def put(self, op: int, length: int, cmd_id: int = 0, cdb: bytes = b"", iovs: tuple[tuple[int, int], ...] = ()) -> None:
        at = CMDR_OFF + self.head
        struct.pack_into("=IHBB", self.area, at, length | op, cmd_id, 0, 0)
        if op == CMD:
            cdb_at = at + 48 + 16 * len(iovs)
            struct.pack_into("=IIIIQ", self.area, at + 8, len(iovs), 0, 0, 0, cdb_at)
            for i, (offset, size) in enumerate(iovs):
                struct.pack_into("=QQ", self.area, at + 48 + 16 * i, offset, size)
            self.area[cdb_at : cdb_at + len(cdb)] = cdb
        self.head = (self.head + length) % CMDR_SIZE
        struct.pack_into("=I", self.area, 12, self.head)

    def command(self, cmd_id: int, cdb: bytes, iovs: tuple[tuple[int, int], ...] = ()) -> None:
        if CMDR_SIZE - self.head < ENTRY_SIZE:
            self.put(PAD, CMDR_SIZE - self.head)
        self.put(CMD, ENTRY_SIZE, cmd_id, cdb, iovs)

    def completions(self) -> list[tuple[int, int, int | None, bytes]]:
        """(cmd_id, status, read_len or None, sense[:18]) of each entry cmd_tail moved over, as the kernel reads them."""
        tail = struct.unpack_from("=I", self.area, 64)[0]
        found = []
        while self.seen_tail != tail:
            at = CMDR_OFF + self.seen_tail
            len_op, cmd_id, _, uflags = struct.unpack_from("=IHBB", self.area, at)
            if len_op & 7 == CMD:
                status = self.area[at + 8]
                read_len = struct.unpack_from("=I", self.area, at + 12)[0] if uflags & 2 else None
                found.append((cmd_id, status, read_len, bytes(self.area[at + 16 : at + 34])))
            self.seen_tail = (self.seen_tail + (len_op & ~7)) % CMDR_SIZE
        return found


def test_fetch_copies_commands_and_completions_go_in_tail_order() -> None:
    kernel = KernelSide()
    ring = Ring(kernel.area)
    read10 = bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0])
    kernel.command(7, read10, ((DATA_OFF, 512),))
    kernel.command(9, bytes([0x00] * 6))
    fetched = ring.fetch()
    assert fetched == [(7, read10, ((DATA_OFF, 512),), 0), (9, bytes(6), (), 0)]
    assert ring.fetch() == []
    ring.complete(9, 0, b"")  # the second command ends first: its answer takes the first slot
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])
    ring.complete(7, 2, sense, 512)
    assert kernel.completions() == [(9, 0, None, bytes(18)), (7, 2, 512, sense)]
    with pytest.raises(RingError):
        ring.complete(1, 0, b"")  # nothing is outstanding


def test_wrap_around_pad_and_tmr_entries() -> None:
    kernel = KernelSide()
    ring = Ring(kernel.area)
    ids = iter(range(1000))
    for _ in range(3):  # go round the ring three times, with a PAD at each wrap and a TMR now and then
        for _ in range(CMDR_SIZE // ENTRY_SIZE - 2):
            kernel.command(next(ids), bytes([0x00] * 6))
            if kernel.head % 1024 == 0:
                kernel.put(TMR, 32)
            fetched = ring.fetch()
            assert len(fetched) == 1
            ring.complete(fetched[0][0], 0, b"")
            ring.skip_idle()
        done = kernel.completions()
        assert done and all(status == 0 for _, status, _, _ in done)
    assert struct.unpack_from("=I", kernel.area, 64)[0] == kernel.head  # everything answered, nothing left behind


def test_many_outstanding_answered_in_any_order() -> None:
    kernel = KernelSide()
    ring = Ring(kernel.area)
    for cmd_id in range(20):
        kernel.command(cmd_id, bytes([0x2A, 0, 0, 0, 0, cmd_id, 0, 0, 1, 0]), ((DATA_OFF + 4096 * cmd_id, 4096),))
    fetched = ring.fetch()
    assert [f[0] for f in fetched] == list(range(20))
    assert all(f[1][5] == f[0] for f in fetched)  # each CDB was copied out before any slot was reused
    order = [5, 19, 0, 7, 3, 12, 1, 18, 2, 4, 6, 8, 9, 10, 11, 13, 14, 15, 16, 17]
    for cmd_id in order:
        ring.complete(cmd_id, 0, b"")
    assert [c[0] for c in kernel.completions()] == order


def test_gather_and_scatter_across_iovecs() -> None:
    kernel = KernelSide()
    ring = Ring(kernel.area)
    iovs = ((DATA_OFF + 8192, 4096), (DATA_OFF, 4096))
    payload = bytes(range(256)) * 32
    assert ring.scatter(iovs, memoryview(payload)) == 8192
    assert kernel.area[DATA_OFF + 8192 : DATA_OFF + 8192 + 4096] == payload[:4096]
    assert kernel.area[DATA_OFF : DATA_OFF + 4096] == payload[4096:]
    assert ring.gather(iovs, 1 << 20) == payload
    assert ring.gather(iovs, 100) == payload[:100]


def test_unknown_mailboxes_and_corrupt_entries_are_refused() -> None:
    with pytest.raises(RingError):
        Ring(KernelSide(flags=0).area)  # no out-of-order completion: not a kernel this handler can serve
    kernel = KernelSide()
    struct.pack_into("=H", kernel.area, 0, 3)
    with pytest.raises(RingError):
        Ring(kernel.area)
    kernel = KernelSide()
    ring = Ring(kernel.area)
    kernel.put(CMD, ENTRY_SIZE, 1, bytes(6))
    struct.pack_into("=I", kernel.area, CMDR_OFF, CMD)  # a zero-length entry would loop forever
    with pytest.raises(RingError):
        ring.fetch()
    kernel = KernelSide()
    ring = Ring(kernel.area)
    kernel.put(CMD, 64, 1)  # too short for an answer: completing it would overwrite the next entry
    with pytest.raises(RingError):
        ring.fetch()
    for iovs in (((AREA - 100, 4096),), ((2**64 - 256, 512),)):  # past the end of the area; wrapping round 2**64
        kernel = KernelSide()
        ring = Ring(kernel.area)
        kernel.command(1, bytes(6), iovs)
        with pytest.raises(RingError):
            ring.fetch()
    kernel = KernelSide()
    ring = Ring(kernel.area)
    kernel.command(1, bytes(6))
    struct.pack_into("=Q", kernel.area, CMDR_OFF + 24, 2**64 - 8)  # a CDB offset that wraps round
    with pytest.raises(RingError):
        ring.fetch()
    kernel = KernelSide()
    ring = Ring(kernel.area)
    kernel.command(1, bytes(6))
    struct.pack_into("=I", kernel.area, CMDR_OFF + 8, 1000)  # more iovecs than the entry holds
    with pytest.raises(RingError):
        ring.fetch()
    kernel = KernelSide()
    ring = Ring(kernel.area)
    struct.pack_into("=I", kernel.area, 12, CMDR_SIZE + 8)  # cmd_head outside the ring
    with pytest.raises(RingError):
        ring.fetch()
    kernel = KernelSide()
    struct.pack_into("=II", kernel.area, 4, 0xFFFFFF00, 0x200)  # a ring whose end wraps round 2**32
    with pytest.raises(RingError):
        Ring(kernel.area)


def test_serve_carries_out_plain_reads_and_writes_in_the_ring(tmp_path: Path) -> None:
    """READ/WRITE 10/16 whose blocks are mapped are done in C between the pool file and the ring's data area (split
    across iovecs too); faults, FUA and out-of-range commands are handed back untouched to the SCSI layer."""

    async def body(s: Service) -> None:
        v = await s.controller.create_vdisk("v", "p", 16 * MIB)
        old = bytes(range(256)) * 2 * 16
        await s.agent.write(v.id, 0, old)  # segment 0 is now mapped
        kernel = KernelSide()
        ring = Ring(kernel.area)
        new = b"N" * 2048 + b"M" * 2048
        kernel.area[DATA_OFF + 8192 : DATA_OFF + 8192 + 2048] = new[:2048]
        kernel.area[DATA_OFF : DATA_OFF + 2048] = new[2048:]
        kernel.command(1, struct.pack(">BBIBHB", 0x2A, 0, 4, 0, 8, 0), ((DATA_OFF + 8192, 2048), (DATA_OFF, 2048)))
        kernel.command(2, struct.pack(">BBQIBB", 0x88, 0, 0, 16, 0, 0), ((DATA_OFF + 16384, 8192),))
        kernel.command(3, struct.pack(">BBIBHB", 0x28, 0, 20000, 0, 8, 0), ((DATA_OFF + 32768, 4096),))  # never written
        kernel.command(4, struct.pack(">BBIBHB", 0x2A, 0, 20000, 0, 8, 0), ((DATA_OFF + 40960, 4096),))  # needs a segment
        kernel.command(5, struct.pack(">BBIBHB", 0x2A, 0x08, 0, 0, 8, 0), ((DATA_OFF + 49152, 4096),))  # FUA
        kernel.command(6, struct.pack(">BBIBHB", 0x28, 0, 32760, 0, 16, 0), ((DATA_OFF + 57344, 8192),))  # past the end
        kernel.area[DATA_OFF + 32768 : DATA_OFF + 36864] = b"\xff" * 4096
        volume = s.agent.volumes[v.id]
        containers = s.agent.containers
        slow, answered = ring.serve(volume.table, containers.fd_table, volume.nblocks, True, containers.dirty)
        assert answered == 3
        assert [command[0] for command in slow] == [4, 5, 6]
        assert kernel.completions() == [(1, 0, None, bytes(18)), (2, 0, 8192, bytes(18)), (3, 0, 4096, bytes(18))]
        expected = old[:2048] + new + old[6144:]
        assert kernel.area[DATA_OFF + 16384 : DATA_OFF + 24576] == expected
        assert kernel.area[DATA_OFF + 32768 : DATA_OFF + 36864] == bytes(4096)
        assert bytes(await s.agent.read(v.id, 0, 16)) == expected
        assert containers.dirty  # the write is waiting for a flush like any other
        # Counted in C as they were answered; what went back to the SCSI layer is counted there, once answered.
        reads, writes = volume.table.io_stats()[READ_IO], volume.table.io_stats()[WRITE_IO]
        assert (reads.commands, reads.bytes, writes.commands, writes.bytes) == (2, 8192 + 4096, 1, 4096)
        assert sum(reads.buckets) == 2 and sum(writes.buckets) == 1 and reads.latency_seconds > 0
        kernel.command(7, struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0), ((DATA_OFF + 65536, 4096),))
        assert ring.serve(volume.table, containers.fd_table, volume.nblocks, True, containers.dirty, False)[1] == 1
        assert volume.table.io_stats()[READ_IO].commands == 2, "with metrics off nothing is counted"

    async def main() -> None:
        service = Service(str(tmp_path))
        await service.start()
        try:
            await service.controller.create_pool("p", 64 * MIB)
            await body(service)
        finally:
            await service.stop()

    asyncio.run(main())
