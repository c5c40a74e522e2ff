"""Check-then-act across an await: management operations on one object are serialized, so nothing they checked
before waiting for the agents is stale after. The races are made deterministic by holding an I/O in flight (the
blocking flag then holds the delete) or a reserve refill (which a pool delete waits for).

The original: a zone created while DELETE /vdisks/X waited for the agent's barrier made the delete fail on a
foreign key after its mappings were removed and committed, leaving a "thick" vdisk with 0 B and a failing check."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from san.agent.agent import AgentIOError
from san.errors import NotFound
from san.service import Service
from san.store.check import check_store

MIB = 1 << 20


async def started(data: Path) -> Service:
    service = Service(str(data))
    await service.start()
    return service


def test_a_zone_cannot_slip_in_while_a_delete_waits_for_io(tmp_path: Path) -> None:
    async def body() -> None:
        s = await started(tmp_path / "data")
        try:
            c = s.controller
            pool = await c.create_pool("p", 64 * MIB)
            thick = await c.create_vdisk("t", "p", 16 * MIB, thin=False)
            await c.finish_thick(thick)
            await c.zoning.create_host("h", "iqn.2024-01.org.example:h")
            table = s.agent.volumes[thick.id].table
            slot = table.io_start()  # an I/O in flight: the blocking DELETE_TABLE waits for it
            delete = asyncio.ensure_future(c.delete_vdisk("t"))
            await asyncio.sleep(0.1)
            assert not delete.done() and thick.state == "deleting"
            zone = asyncio.ensure_future(c.zoning.add("h", "t"))
            grow = asyncio.ensure_future(c.grow_vdisk("t", 32 * MIB))
            await asyncio.sleep(0.1)
            assert not zone.done() and not grow.done(), "they wait for the delete instead of acting under it"
            table.io_end(slot)
            await delete
            for late in (zone, grow):
                with pytest.raises(NotFound):
                    await late
            assert c.zoning.zones == [] and "t" not in {v.name for v in c.vdisks.values()}
            assert c.usage(pool).used_bytes == 0
        finally:
            await s.stop()

    asyncio.run(body())
    assert check_store(str(tmp_path / "data" / "san.db"))[0] == []


def test_a_zone_made_first_stops_the_delete(tmp_path: Path) -> None:
    async def body() -> None:
        s = await started(tmp_path / "data")
        try:
            c = s.controller
            await c.create_pool("p", 64 * MIB)
            thick = await c.create_vdisk("t", "p", 16 * MIB, thin=False)
            await c.finish_thick(thick)
            await c.zoning.create_host("h", "iqn.2024-01.org.example:h")
            zone = asyncio.ensure_future(c.zoning.add("h", "t"))
            delete = asyncio.ensure_future(c.delete_vdisk("t"))
            await zone
            with pytest.raises(Exception, match="zoned to h"):
                await delete
            assert thick.state == "ready" and c.allocated_bytes(thick) == 16 * MIB
        finally:
            await s.stop()

    asyncio.run(body())
    assert check_store(str(tmp_path / "data" / "san.db"))[0] == []


def test_a_vdisk_cannot_be_created_in_a_pool_being_deleted(tmp_path: Path) -> None:
    async def body() -> None:
        s = await started(tmp_path / "data")
        try:
            c = s.controller
            zero = c.zero_runs

            def slow_zero(pool_id: int, runs: list[tuple[int, int, int]], keep_allocated: bool = False) -> None:
                time.sleep(0.5)  # a refill in flight, which the pool delete waits for
                zero(pool_id, runs, keep_allocated)

            c.zero_runs = slow_zero  # type: ignore[method-assign]
            await c.create_pool("p", 64 * MIB)
            await asyncio.sleep(0.05)
            delete = asyncio.ensure_future(c.delete_pool("p"))
            await asyncio.sleep(0.05)
            create = asyncio.ensure_future(c.create_vdisk("v", "p", 8 * MIB))
            await delete
            with pytest.raises(NotFound):
                await create
            assert c.pools == {} and c.vdisks == {}
        finally:
            await s.stop()

    asyncio.run(body())
    assert check_store(str(tmp_path / "data" / "san.db"))[0] == []


def test_a_deleted_vdisks_segments_are_punched_before_anyone_gets_them(tmp_path: Path) -> None:
    """Punching a deleted vdisk's space takes time; a segment handed to another vdisk meanwhile must not be zeroed
    under it, after that vdisk wrote and flushed it."""

    async def body() -> None:
        s = await started(tmp_path / "data")
        try:
            c = s.controller
            manager = c.vdisk_manager
            punch = manager.punch

            def slow_punch(*args: Any) -> None:
                time.sleep(0.5)
                punch(*args)

            manager.punch = slow_punch  # type: ignore[method-assign,assignment]
            await c.create_pool("p", 8 * MIB)
            a = await c.create_vdisk("a", "p", 8 * MIB)
            b = await c.create_vdisk("b", "p", 8 * MIB)
            for seg in range(6):
                await s.agent.write(a.id, seg * 2048, b"a" * 512)
            await s.agent.flush()
            delete = asyncio.ensure_future(c.delete_vdisk("a"))
            written: set[int] = set()
            while len(written) < 6:
                for seg in range(6):
                    if seg not in written:
                        try:
                            await s.agent.write(b.id, seg * 2048, f"b{seg}".encode().ljust(512, b"."))
                            written.add(seg)
                        except AgentIOError:
                            pass  # no space until the delete gives its segments back
                await s.agent.flush()
                await asyncio.sleep(0.05)
            await delete
            await asyncio.sleep(0.6)
            for seg in range(6):
                assert bytes(await s.agent.read(b.id, seg * 2048, 1)) == f"b{seg}".encode().ljust(512, b".")
        finally:
            await s.stop()

    asyncio.run(body())
    assert check_store(str(tmp_path / "data" / "san.db"))[0] == []
