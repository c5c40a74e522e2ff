"""Races around snapshots, each forced at its narrowest point (a slow copy, a late fence answer, a slow agent, a
barrier that fires in the writer's thread): copy on write that a snapshot, a revoke or a reclaim overtakes; a FUA
write whose bits a background report took; NOWRITE that copy on write must not get round. In one process."""

import array
import asyncio
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from san._fastmap import NOWRITE, MapTable
from san.agent import alternates
from san.agent._blockio import DONE, write_blocks
from san.agent.agent import Agent, AgentIOError
from san.model import MIB
from san.protocol.messages import Op, Reason
from san.service import Service

BLOCK = 512
SEG = MIB // BLOCK
Body = Any


def block(tag: str, size: int = BLOCK) -> bytes:
    return tag.encode().ljust(size, b".")


def run(data: str, body: Body) -> None:
    async def main() -> None:
        s = Service(data, network=None)
        await s.start()
        try:
            await body(s)
        finally:
            await s.stop()

    asyncio.run(main())


def committed_bits(data: Path, name: str, vseg: int) -> set[int]:
    with sqlite3.connect(data / "san.db") as db:
        row = db.execute(
            "SELECT bitmap FROM mapping m JOIN vdisk v ON v.id = m.vdisk_id WHERE v.name = ? AND vseg = ?", (name, vseg)
        ).fetchone()
    return {i for i in range(SEG) if row[0] and int.from_bytes(row[0], "little") >> i & 1}


def test_nowrite_stays_read_only_once_a_snapshot_shares_the_segment(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 4 * MIB)
        await s.agent.write(v.id, 0, block("base") * SEG)
        await s.agent.flush()
        await c.set_state("v", 0, 1, NOWRITE)
        await c.snapshots.create("v@s")
        with pytest.raises(AgentIOError) as refused:
            await s.agent.write(v.id, 0, block("x"))
        assert refused.value.reason is Reason.WRITE_PROTECTED
        assert bytes(await s.agent.read(v.id, 0, 1)) == block("base")
        await s.agent.write(v.id, SEG, block("y"))  # the next segment is not read-only: copied on write
        assert bytes(await s.agent.read(v.id, SEG, 1)) == block("y")

    run(str(tmp_path), body)


def test_a_fua_write_is_durable_when_a_report_took_its_bits_first(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c, a = s.controller, s.agent
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 4 * MIB)
        await a.write(v.id, 0, block("base") * SEG)
        await a.flush()
        await c.snapshots.create("v@s")
        await a.write(v.id, 64, block("cow"), fua=True)
        await a.write(v.id, 100, block("w1") * 8)
        await a._report_all()  # a background report takes the bits: recorded, not committed
        await a.write(v.id, 100, block("fua") * 8, fua=True)
        assert set(range(100, 108)) <= committed_bits(tmp_path, "v", 0)

    run(str(tmp_path), body)


def test_a_copy_on_write_overtaken_by_a_snapshot_starts_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_copy = alternates.copy_blocks

    def copy(*args: Any) -> int:
        time.sleep(0.1)
        return slow_copy(*args)

    monkeypatch.setattr(alternates, "copy_blocks", copy)
    fenced = Agent._fenced

    async def late(self: Agent, *args: Any) -> Any:
        await asyncio.sleep(0.3)  # as when a report in flight holds the reporting lock
        return await fenced(self, *args)

    monkeypatch.setattr(Agent, "_fenced", late)

    async def body(s: Service) -> None:
        c, a = s.controller, s.agent
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 4 * MIB)
        await a.write(v.id, 0, block("base") * SEG)
        await c.snapshots.create("v@1")
        await a.write(v.id, 10, block("gen1"))  # an alternate location
        await c.snapshots.create("v@2")  # shared now
        writing = asyncio.ensure_future(a.write(v.id, 20, block("w1")))  # copies it (slowly)
        await asyncio.sleep(0.01)
        snap = await c.snapshots.create("v@3")
        await writing
        before = bytes(await a.read(snap.id, 20, 1))
        await a.write(v.id, 20, block("after"))
        await a.flush()
        assert bytes(await a.read(snap.id, 20, 1)) == before, "a write after the snapshot changed it"

    run(str(tmp_path), body)


def test_a_reclaim_does_not_unshare_what_a_new_snapshot_shares(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c, a = s.controller, s.agent
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 4 * MIB)
        await a.write(v.id, 0, block("base") * SEG)
        await a.flush()
        await c.snapshots.create("v@1")
        broadcast = c.agents.broadcast

        async def slow(request: Any, *args: Any, **kw: Any) -> None:
            if getattr(request, "op", None) is Op.CLEAR_STATE:
                await asyncio.sleep(0.3)  # a slow agent
            await broadcast(request, *args, **kw)

        c.agents.broadcast = slow  # type: ignore[method-assign]
        await c.snapshots.delete("v@1")
        await asyncio.sleep(0.1)
        snap = await c.snapshots.create("v@2")
        while c.snapshots.reclaims:
            await asyncio.sleep(0.05)
        await a.write(v.id, 0, block("after"))
        assert bytes(await a.read(snap.id, 0, 1)) == block("base"), "v@2 changed by a later write"

    run(str(tmp_path), body)


def test_a_write_sets_its_bits_before_a_barrier_learns_it_ended(tmp_path: Path) -> None:
    """The barrier's callback thaws the alternate location in the writer's own thread, as the loop would once the
    I/O has ended: the write's bits must be set by then."""
    bs, nblk = 4096, 16384  # 64 MiB segments: the write takes long enough to take a barrier during it
    fd = os.open(tmp_path / "c", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 3 * bs * nblk)
    table = MapTable(1, nblk, bs)
    table.set_entries(0, [(0, 0, 0)])
    table.set_alternate(0, 0, 1, None, writable=True)
    out: list[int] = []
    writer = threading.Thread(target=lambda: out.append(write_blocks(table, array.array("i", [fd]), 0, bytes(bs * nblk), set())))
    writer.start()
    while table.inflight == 0 and writer.is_alive():
        pass
    if not table.inflight:
        pytest.skip("the write ended before a barrier could be taken during it")
    frozen = table.freeze_alternates(0, 1)
    table.barrier(lambda: table.thaw(frozen))
    writer.join()
    os.close(fd)
    alternate = table.get_entries(0, 1)[0][3]
    assert out == [DONE] and alternate is not None and all(b == 0xFF for b in alternate[2]), "every block it wrote is there"


def test_a_grant_revoked_during_a_copy_on_write_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_copy = alternates.copy_blocks

    def copy(*args: Any) -> int:
        time.sleep(0.2)
        return slow_copy(*args)

    monkeypatch.setattr(alternates, "copy_blocks", copy)

    async def body(s: Service) -> None:
        c, a = s.controller, s.agent
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 4 * MIB)
        await a.write(v.id, 0, block("base") * SEG)
        await c.snapshots.create("v@1")
        await a.write(v.id, 10, block("gen1"))
        await c.snapshots.create("v@2")
        await a.flush()
        writing = asyncio.ensure_future(a.write(v.id, 20, block("w")))  # copies on write from a granted segment
        await asyncio.sleep(0.05)
        await c.policy._revoke(next(iter(c.agents.sessions)), v.id)  # the pool ran short: grants taken back
        await writing
        await a.flush()  # the report names only a segment that is still the agent's
        assert bytes(await a.read(v.id, 20, 1)) == block("w")
        assert bytes(await a.read(v.id, 10, 1)) == block("gen1")

    run(str(tmp_path), body)
