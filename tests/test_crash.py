"""Crash safety: a child allocates and writes through the controller and agent and is SIGKILLed at random.

After each kill `san check` must be clean and every block must read back as last flushed, as a later
write, or as zeros where nothing was flushed: never another vdisk's bytes. A block whose write was in flight when
the kill came may be torn (buffered pwrite stops mid-page on SIGKILL), but only ever into a byte-wise mix of its own
old and new contents."""

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from crash_child import BLOCK, pattern

from san.service import Service

ROUNDS = 24
CHILD = Path(__file__).with_name("crash_child.py")


class Model:
    """What each block may hold after a crash, from the child's journal."""

    def __init__(self) -> None:
        self.stable: dict[str, dict[int, int]] = defaultdict(dict)
        self.last: dict[str, dict[int, int]] = defaultdict(dict)
        self.recent: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
        self.torn: dict[str, dict[int, bytes]] = defaultdict(dict)
        self.exists: dict[str, str] = {}

    def replay(self, lines: list[str]) -> None:
        pending: tuple[str, int, int, int, bool] | None = None
        for line in lines:
            word, *rest = line.split()
            if word == "W":
                name, lba, count, gen, fua = rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4] == "1"
                pending = (name, lba, count, gen, fua)
                for b in range(lba, lba + count):
                    self.recent[name][b].add(gen)
            elif word == "WE" and pending is not None:
                name, lba, count, gen, fua = pending
                for b in range(lba, lba + count):
                    self.last[name][b] = gen
                    if fua:
                        self.stable[name][b] = gen
                        self.recent[name][b] = set()
                pending = None
            elif word == "FE":
                for name, blocks in self.last.items():
                    self.stable[name].update(blocks)
                self.recent.clear()
            elif word in ("C", "D"):
                self.exists[rest[0]] = "maybe"
            elif word == "CE":
                self.exists[rest[0]] = "yes"
            elif word == "DE":
                self.exists[rest[0]] = "no"

    def acceptable(self, name: str, lba: int) -> set[int]:
        return {self.stable[name].get(lba, 0)} | self.recent[name].get(lba, set())

    def content(self, name: str, lba: int, gen: int) -> bytes:
        if gen == TORN:
            return self.torn[name][lba]
        return bytes(BLOCK) if gen == 0 else pattern(name, lba, gen)

    def settle(self, name: str, observed: dict[int, int]) -> None:
        """After verification, what was read is the new durable baseline."""
        self.torn[name] = {lba: data for lba, data in self.torn[name].items() if observed.get(lba) == TORN}
        self.stable[name] = {lba: gen for lba, gen in observed.items() if gen}
        self.last[name] = dict(self.stable[name])
        self.recent.pop(name, None)


TORN = -1


def check_block(model: Model, name: str, lba: int, data: bytes) -> int:
    """The generation a block holds, or TORN for a byte-wise mix of contents it may hold (only while a write to it
    was in flight); AssertionError for anything else."""
    allowed = model.acceptable(name, lba)
    for gen in allowed:
        if data == model.content(name, lba, gen):
            return gen
    candidates = [model.content(name, lba, g) for g in allowed]
    if len(candidates) > 1 and all(any(c[i] == byte for c in candidates) for i, byte in enumerate(data)):
        model.torn[name][lba] = data
        return TORN
    gen = decode_block(name, lba, data)  # names foreign or torn bytes
    raise AssertionError(f"{name} block {lba} holds generation {gen}, expected one of {sorted(allowed)}")


def decode_block(name: str, lba: int, data: bytes) -> int:
    """The generation a block holds (0 for zeros); AssertionError for anything this vdisk never wrote there."""
    if data == bytes(BLOCK):
        return 0
    head = data.split(b":")
    first = next(i for i, byte in enumerate(data) if byte)
    assert head[0].decode(errors="replace") == name and head[1].isdigit() and int(head[1]) == lba, (
        f"{name} block {lba} holds foreign bytes {data[:40]!r}; first non-zero byte at {first}: {data[first : first + 40]!r}"
    )
    gen = int(head[2])
    assert data == pattern(name, lba, gen), f"{name} block {lba} is torn: {data[:40]!r}"
    return gen


async def verify(data: str, model: Model) -> int:
    service = Service(data)
    await service.start()
    try:
        c = service.controller
        while c.unfinished_thick() or c.progress:
            await asyncio.sleep(0.01)
        present = {v.name: v for v in c.vdisks.values()}
        for name, state in model.exists.items():
            if state == "yes":
                assert name in present, f"vdisk {name} was created and is gone"
            if state == "no":
                assert name not in present, f"vdisk {name} was deleted and is back"
        checked = 0
        for name, vdisk in present.items():
            assert name in model.exists, f"unknown vdisk {name}"
            model.exists[name] = "yes"
            content = bytes(await service.agent.read(vdisk.id, 0, vdisk.nblocks))
            observed = {}
            for lba in range(vdisk.nblocks):
                observed[lba] = check_block(model, name, lba, content[lba * BLOCK : (lba + 1) * BLOCK])
                checked += 1
            model.settle(name, observed)
        for name in [n for n, s in model.exists.items() if s == "maybe"]:
            model.exists[name] = "no"
        return checked
    finally:
        await service.stop()


def test_sigkill_at_random_moments_loses_nothing_flushed(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    journal = tmp_path / "journal"
    journal.touch()
    model = Model()
    rng = random.Random(2026)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHILD.parent), *sys.path])}
    kills = 0
    for round_number in range(1, ROUNDS + 1):
        start = journal.stat().st_size
        child = subprocess.Popen([sys.executable, str(CHILD), data, str(journal), str(round_number)], env=env)
        deadline = time.monotonic() + 60
        while b"READY" not in journal.read_bytes()[start:] and child.poll() is None:
            assert time.monotonic() < deadline, "child did not start"
            time.sleep(0.01)
        assert child.poll() is None, f"child died on its own with status {child.returncode}"
        time.sleep(rng.uniform(0.02, 1.0))
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        kills += 1
        with open(journal) as f:
            f.seek(start)
            lines = [line for line in f.read().splitlines() if line.strip()]
        assert len(lines) > 1
        model.replay(lines)
        check = subprocess.run(
            [sys.executable, "-m", "san.cli.main", "check", "--data", data], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, f"round {round_number}: san check failed:\n{check.stdout}{check.stderr}"
        assert asyncio.run(verify(data, model)) > 0
    assert kills >= 20
