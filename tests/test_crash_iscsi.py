"""Crash safety end to end: an iSCSI client writes, unmaps and flushes while `san serve` is killed with SIGKILL at
random moments and restarted. Every flushed write must read back, nothing may read back stale, `san check` is clean.

Each block carries its LBA and a generation number, so a block from the wrong place or the wrong time shows."""

from __future__ import annotations

import random
import struct
import threading
from pathlib import Path

from conftest import SanServer, assert_clean
from rawiscsi import RawInitiator

TARGET = "iqn.2003-01.org.san:crash"
INITIATOR = "iqn.2024-01.org.example:crash"
ROUNDS = 10
NBLOCKS = 8192  # a 4 MiB vdisk in 64 KiB segments: 64 segments, many allocations and reuses
BLOCK = 512


def pattern(lba: int, gen: int) -> bytes:
    return f"lba={lba} gen={gen};".encode().ljust(BLOCK, b"~")


def decode(lba: int, data: bytes) -> int:
    """The generation a block holds (0 for zeros); fails the test on a block from elsewhere."""
    if data == bytes(BLOCK):
        return 0
    head = data.split(b";", 1)[0].decode(errors="replace")
    assert head.startswith(f"lba={lba} gen="), f"block {lba} holds foreign or stale bytes: {data[:40]!r}"
    gen = int(head.split("gen=")[1])
    assert data == pattern(lba, gen), f"block {lba} is torn: {data[:40]!r}"
    return gen


class Model:
    """What each block may hold: its flushed generation, or one written since the last flush."""

    def __init__(self) -> None:
        self.flushed: dict[int, int] = {}
        self.unflushed: dict[int, set[int]] = {}

    def wrote(self, lba: int, count: int, gen: int) -> None:
        for block in range(lba, lba + count):
            self.unflushed.setdefault(block, set()).add(gen)

    def flushed_all(self, through: dict[int, int]) -> None:
        self.flushed.update(through)
        self.unflushed.clear()

    def acceptable(self, lba: int) -> set[int]:
        return {self.flushed.get(lba, 0)} | self.unflushed.get(lba, set())


def write10(lba: int, count: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, count, 0)


def read10(lba: int, count: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, count, 0)


def unmap_parameters(lba: int, count: int) -> bytes:
    return struct.pack(">HH4xQI4x", 22, 16, lba, count)


def run_round(server: SanServer, model: Model, rng: random.Random, gen: int) -> int:
    """Write until the target is killed under us; returns the next generation number."""
    killer = threading.Timer(rng.uniform(0.2, 1.5), server.kill)
    initiator = RawInitiator(server.iscsi_port, INITIATOR, timeout=20)
    latest: dict[int, int] = {}
    try:
        response = initiator.login(TARGET)
        assert response.bhs[36:38] == b"\0\0", response.bhs[36:38]
        killer.start()
        while True:
            op = rng.random()
            if op < 0.15:
                response = initiator.command(0, struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0))
                assert response.status == 0
                model.flushed_all(latest)
                latest = {}
            elif op < 0.22:
                count = rng.choice([16, 128, 200, 300])
                lba = rng.randrange(0, NBLOCKS - count)
                model.wrote(lba, count, 0)
                params = unmap_parameters(lba, count)
                response = initiator.command(0, struct.pack(">BBI x H x", 0x42, 0, 0, len(params)), params)
                assert response.status == 0, response.sense
                latest.update(dict.fromkeys(range(lba, lba + count), 0))
            else:
                gen += 1
                count = rng.choice([1, 1, 4, 16, 64])
                lba = rng.randrange(0, NBLOCKS - count)
                model.wrote(lba, count, gen)
                data = b"".join(pattern(lba + i, gen) for i in range(count))
                response = initiator.command(0, write10(lba, count), data)
                assert response.status == 0, response.sense
                latest.update(dict.fromkeys(range(lba, lba + count), gen))
    except (ConnectionError, OSError):
        pass
    finally:
        killer.cancel()
        killer.join()
        initiator.close()
    server.kill()
    return gen


def verify(server: SanServer, model: Model) -> None:
    """Read everything back; each block must hold an acceptable generation, which becomes its flushed one."""
    initiator = RawInitiator(server.iscsi_port, INITIATOR, timeout=30)
    try:
        assert initiator.login(TARGET).bhs[36:38] == b"\0\0"
        observed: dict[int, int] = {}
        step = 256
        for lba in range(0, NBLOCKS, step):
            response = initiator.command(0, read10(lba, step), read_length=step * BLOCK)
            assert response.status == 0 and len(response.data) == step * BLOCK
            for i in range(step):
                block = lba + i
                gen = decode(block, response.data[i * BLOCK : (i + 1) * BLOCK])
                assert gen in model.acceptable(block), f"block {block}: gen {gen}, expected one of {model.acceptable(block)}"
                observed[block] = gen
        model.flushed_all(observed)
    finally:
        initiator.close()


def test_sigkill_of_san_serve_loses_nothing_flushed(tmp_path: Path) -> None:
    server = SanServer(tmp_path / "data", tmp_path / "cwd", extra=("--iqn", TARGET, "--open-access"))
    server.start()
    server.ok("pool", "create", "p", "--size", "32M", "--segment-size", "64K")
    server.ok("vdisk", "create", "v", "--pool", "p", "--size", str(NBLOCKS * BLOCK))
    rng = random.Random(20261125)
    model = Model()
    gen = 0
    try:
        for _ in range(ROUNDS):
            gen = run_round(server, model, rng, gen)
            assert not server.running
            assert_clean(server.data)
            server.start()
            verify(server, model)
        assert gen > ROUNDS * 10, "the client wrote too little to test anything"
    finally:
        server.kill()
