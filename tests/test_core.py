"""The controller and an agent in one process: thin, thick, faults, reuse. Every test runs twice: through the
in-process link, and through the real link (mutual TLS on 127.0.0.1), so that every message crosses the codec.

Real sparse files under a temporary data directory; every check reads back through the agent."""

import asyncio
import contextlib
import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from san._fastmap import ERROR, NOWRITE, ZERO
from san.agent.agent import AgentIOError
from san.errors import Conflict, InvalidRequest, NoSpace
from san.model import MIB
from san.protocol.messages import Action, Allocated, Command, Op, Reason
from san.service import LOCAL_AGENT, DataDirLocked, Service
from san.store.check import check_store

Body = Callable[[Service], Awaitable[None]]
LINK: dict[str, str | None] = {"network": None}
RUNS = itertools.count()


@pytest.fixture(autouse=True, params=["in-process", "tls"])
def link(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Which link run() joins the controller and the agent with."""
    LINK["network"] = str(tmp_path_factory.mktemp("cluster") / "certs") if request.param == "tls" else None
    yield
    LINK["network"] = None


def run(data: str, body: Body, **options: object) -> None:
    async def main() -> None:
        base = LINK["network"]
        network = f"{base}-{next(RUNS)}" if base is not None else None  # a cluster directory per start
        service = Service(data, network=network, **options)  # type: ignore[arg-type]
        await service.start()
        try:
            await body(service)
        finally:
            await service.stop()

    asyncio.run(main())


def block(tag: str, size: int = 512) -> bytes:
    return tag.encode().ljust(size, b".")


def test_thin_vdisk_reads_zeros_and_allocates_on_write(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 16 * MIB)
        assert bytes(await s.agent.read(v.id, 0, 64)) == bytes(64 * 512)
        assert c.allocated_bytes(v) == 0
        await s.agent.write(v.id, 5000, block("hello") * 3)
        assert c.allocated_bytes(v) == MIB
        assert bytes(await s.agent.read(v.id, 5000, 3)) == block("hello") * 3
        assert bytes(await s.agent.read(v.id, 4999, 1)) == bytes(512)

    run(str(tmp_path), body)


def test_zero_writes_to_thin_space_allocate_nothing(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 16 * MIB)
        await s.agent.write(v.id, 0, bytes(4 * MIB))
        assert c.allocated_bytes(v) == 0
        await s.agent.write(v.id, 2048, block("x") + bytes(MIB))
        assert c.allocated_bytes(v) == MIB, "only the segment with non-zero data is allocated"
        assert [m.vseg for m in c.mappings(v.id, 0, 16)] == [1]
        assert bytes(await s.agent.read(v.id, 2048, 1)) == block("x")

    run(str(tmp_path), body)


def test_sequential_writer_gets_contiguous_segments_allocated_ahead(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        pool = await c.create_pool("p", 256 * MIB, allocate_ahead=4)
        v = await c.create_vdisk("v", "p", 64 * MIB)
        faults = 0
        original = c.policy.handle_fault

        def counting(fault, agent=""):  # type: ignore[no-untyped-def]
            nonlocal faults
            if fault.write:
                faults += 1
            return original(fault, agent)

        c.policy.handle_fault = counting  # type: ignore[method-assign]
        for seg in range(20):
            await s.agent.write(v.id, seg * 2048, block(f"s{seg}") * 2048)
        await s.agent.flush()  # mappings made from a grant reach the controller in the flush's report
        mappings = c.mappings(v.id, 0, 20)
        assert [m.vseg for m in mappings] == list(range(20))
        psegs = [m.pseg for m in mappings]
        assert psegs == list(range(psegs[0], psegs[0] + 20)), psegs
        assert faults <= 20 // 5 + 2, faults
        assert pool.allocate_ahead == 4

    run(str(tmp_path), body)


def test_many_first_writes_at_once_all_read_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by bench/cluster.py through a gateway: 32 first writes in flight, each into a new segment; a fault's
    answer (allocating ahead) overwrote a segment just mapped from the grant, its report was refused and the write
    failed. Every write must land, and read back, with no report refused."""

    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 256 * MIB, segment_size=64 * 1024)
        v = await c.create_vdisk("v", "p", 64 * MIB)
        per = 128  # blocks per 64 KiB segment
        window = asyncio.Semaphore(32)  # as an initiator keeps 32 commands in flight: one starts as one ends

        async def write(seg: int) -> None:
            async with window:
                await s.agent.write(v.id, seg * per, block(f"seg{seg}") * 8)

        await asyncio.gather(*(write(seg) for seg in range(512)))
        await s.agent.flush()
        for seg in range(512):
            assert bytes(await s.agent.read(v.id, seg * per, 8)) == block(f"seg{seg}") * 8, seg
        assert not [r for r in caplog.records if "refused" in r.getMessage()]

    run(str(tmp_path), body)


def test_freed_segments_never_show_old_data(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 8 * MIB, segment_size=MIB)
        old = await c.create_vdisk("old", "p", 8 * MIB)
        await s.agent.write(old.id, 0, block("secret") * (16384 - 1) + block("end"))
        await s.agent.flush()
        await c.delete_vdisk("old")
        new = await c.create_vdisk("new", "p", 8 * MIB)
        for seg in range(8):
            await s.agent.write(new.id, seg * 2048 + 7, block("mine"))
        data = bytes(await s.agent.read(new.id, 0, 16384))
        assert b"secret" not in data and b"end" not in data
        for seg in range(8):
            assert data[(seg * 2048 + 7) * 512 :][:512] == block("mine")
        assert data.count(b"mine") == 8

    run(str(tmp_path), body)


def test_thick_vdisk_is_fully_allocated_and_zeroed(tmp_path: Path) -> None:
    path = tmp_path / "dirty.img"
    path.write_bytes(b"\xee" * (16 * MIB))

    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", path=str(path), existing=True)
        v = await c.create_vdisk("v", "p", 10 * MIB, thin=False)
        assert v.state == "allocating"
        seen: list[float] = []
        await c.finish_thick(v, seen.append)
        assert v.state == "ready" and seen[-1] == 1.0
        assert c.allocated_bytes(v) == 10 * MIB
        assert bytes(await s.agent.read(v.id, 0, 20480)) == bytes(10 * MIB)
        with pytest.raises(NoSpace):
            await c.create_vdisk("big", "p", 7 * MIB, thin=False)
        await c.grow_vdisk("v", 12 * MIB)
        assert c.allocated_bytes(v) == 12 * MIB
        assert bytes(await s.agent.read(v.id, 20480, 4096)) == bytes(2 * MIB)

    run(str(tmp_path / "data"), body, allow_paths=(str(tmp_path),))


def test_out_of_space_fails_writes_that_allocate_only(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 4 * MIB)
        v = await c.create_vdisk("v", "p", 64 * MIB)
        for seg in range(4):
            await s.agent.write(v.id, seg * 2048, block("full"))
        with pytest.raises(AgentIOError) as failure:
            await s.agent.write(v.id, 10 * 2048, block("more"))
        assert failure.value.reason is Reason.NO_SPACE
        await s.agent.write(v.id, 3 * 2048 + 1, block("still"))
        assert bytes(await s.agent.read(v.id, 3 * 2048, 2)) == block("full") + block("still")
        assert bytes(await s.agent.read(v.id, 10 * 2048, 1)) == bytes(512)

    run(str(tmp_path), body)


def test_error_and_nowrite_states(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 16 * MIB)
        v = await c.create_vdisk("v", "p", 8 * MIB)
        await s.agent.write(v.id, 0, block("a"))
        await c.set_state("v", 0, 1, NOWRITE)
        assert bytes(await s.agent.read(v.id, 0, 1)) == block("a")
        with pytest.raises(AgentIOError) as refused:
            await s.agent.write(v.id, 0, block("b"))
        assert refused.value.reason is Reason.WRITE_PROTECTED
        await s.agent.handle(Command(Op.SET_STATE, vdisk=v.id, start=1, count=1, bits=ERROR))
        with pytest.raises(AgentIOError) as failed:
            await s.agent.read(v.id, 2048, 1)
        assert failed.value.reason is Reason.IO_ERROR

    run(str(tmp_path), body)


def test_blocking_delete_waits_for_io_in_flight(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 16 * MIB)
        v = await c.create_vdisk("v", "p", 8 * MIB)
        await s.agent.write(v.id, 0, block("a"))
        table = s.agent.volumes[v.id].table
        slot = table.io_start()
        deleting = asyncio.ensure_future(c.delete_vdisk("v"))
        await asyncio.sleep(0.05)
        assert not deleting.done()
        assert c.mappings(v.id, 0, 8), "segments were freed while I/O was in flight"
        table.io_end(slot)
        await asyncio.wait_for(deleting, 5)
        assert c.mappings(v.id, 0, 8) == []
        assert c.usage(c.pool("p")).used_bytes == 0

    run(str(tmp_path), body)


def test_restart_reloads_tables_by_faulting(tmp_path: Path) -> None:
    ids: dict[str, int] = {}

    async def first(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 64 * MIB, segment_size=64 * 1024)
        v = await c.create_vdisk("v", "p", 32 * MIB, block_size=4096)
        ids["v"] = v.id
        await s.agent.write(v.id, 100, block("four-k", 4096) * 3)
        await s.agent.flush()

    async def second(s: Service) -> None:
        table = s.agent.volumes[ids["v"]].table
        assert table.get_entries(0, 1)[0][2] & 1, "a restarted agent starts with INVALID entries"
        assert bytes(await s.agent.read(ids["v"], 100, 3)) == block("four-k", 4096) * 3
        assert table.get_entries(0, 1)[0][2] == ZERO

    run(str(tmp_path), first)
    run(str(tmp_path), second)


def test_management_errors_change_nothing(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 16 * MIB)
        with pytest.raises(Conflict):
            await c.create_pool("p", 16 * MIB)
        for bad in (dict(segment_size=3 * MIB), dict(segment_size=32 * 1024), dict(warn_percent=0)):
            with pytest.raises(InvalidRequest):
                await c.create_pool("q", 16 * MIB, **bad)  # type: ignore[arg-type]
        assert not os.path.exists(os.path.join(s.data_dir, "pools", "q.img"))
        await c.create_vdisk("v", "p", MIB)
        with pytest.raises(InvalidRequest):
            await c.create_vdisk("w", "p", 1000)
        with pytest.raises(Conflict):
            await c.delete_pool("p")
        assert [p.name for p in c.pools.values()] == ["p"]
        assert [v.name for v in c.vdisks.values()] == ["v"]

    run(str(tmp_path), body)


def test_one_service_per_data_directory(tmp_path: Path) -> None:
    service = Service(str(tmp_path))
    try:
        with pytest.raises(DataDirLocked):
            Service(str(tmp_path))
    finally:
        service.controller.close()
        service.data.close()


def test_one_store_cannot_back_two_pools_or_the_metadata(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 16 * MIB)
        image = os.path.join(s.data_dir, "pools", "p.img")
        link = tmp_path / "link.img"
        link.symlink_to(image)
        for alias in (str(link), "/" + image, os.path.join(s.data_dir, "pools", ".", "p.img")):
            with pytest.raises(Conflict):
                await c.create_pool("q", path=alias)
        for inside in ("san.db", "san.db-wal", "lock", "other.img"):
            with pytest.raises(InvalidRequest):
                await c.create_pool("q", 16 * MIB, path=os.path.join(s.data_dir, inside))
        for bad in ("a\n", "a/b", "", "x" * 64):
            with pytest.raises(InvalidRequest):
                await c.create_pool(bad, 16 * MIB)
        with pytest.raises(InvalidRequest):
            await c.create_pool("q", 16 * MIB, path=str(tmp_path / "nul\0.img"))
        assert [p.name for p in c.pools.values()] == ["p"]

    run(str(tmp_path / "data"), body)


def test_thick_claims_never_take_segments_still_being_zeroed(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        zero = c.zero_runs

        def slow_zero(pool_id: int, runs: list[tuple[int, int, int]], keep_allocated: bool = False) -> None:
            time.sleep(0.5)  # a block device without discard, or huge segments
            zero(pool_id, runs, keep_allocated)

        c.zero_runs = slow_zero  # type: ignore[method-assign]
        await c.create_pool("p", 100 * MIB)
        await asyncio.sleep(0.05)
        assert c.allocators[c.pool("p").id].in_flight
        a = await c.create_vdisk("a", "p", 50 * MIB, thin=False)
        await c.finish_thick(a)
        await s.agent.write(a.id, 0, block("kept"), fua=True)
        with pytest.raises(NoSpace):
            await c.create_vdisk("b", "p", 60 * MIB, thin=False)
        await asyncio.sleep(0.8)
        assert bytes(await s.agent.read(a.id, 0, 1)) == block("kept")
        assert c.usage(c.pool("p")).used_bytes == 50 * MIB

    run(str(tmp_path), body)
    problems, _ = check_store(str(tmp_path / "san.db"))
    assert problems == []


def test_a_failed_metadata_commit_loses_no_allocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 16 * MIB)
        v = await c.create_vdisk("v", "p", 8 * MIB)
        await s.agent.write(v.id, 0, block("a"))
        real_commit = c.store.commit

        def disk_full() -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(c.store, "commit", disk_full)
        with pytest.raises(AgentIOError) as failed:
            await s.agent.flush()
        assert failed.value.reason is Reason.IO_ERROR
        monkeypatch.setattr(c.store, "commit", real_commit)
        await s.agent.flush()
        assert c.store.count_mappings(v.id) == 1

    run(str(tmp_path), body)
    problems, _ = check_store(str(tmp_path / "san.db"))
    assert problems == []


def test_a_full_pool_does_not_inflate_the_reserve(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 2 * MIB)
        await asyncio.sleep(0.1)  # let the background refill run
        v = await c.create_vdisk("v", "p", 64 * MIB)
        allocator = c.allocators[c.pool("p").id]
        target = allocator.reserve_target
        for seg in range(6):
            with contextlib.suppress(AgentIOError):
                await s.agent.write(v.id, seg * 2048, block("x"))
        assert allocator.reserve_target <= target
        assert c.allocated_bytes(v) == 2 * MIB

    run(str(tmp_path), body)


def test_first_writes_map_granted_segments_without_asking(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 256 * MIB)
        v = await c.create_vdisk("v", "p", 128 * MIB)
        await asyncio.sleep(0.1)  # let the background refill fill the reserve
        writes: list[int] = []
        original = c.policy.handle_fault

        def counting(fault, agent=""):  # type: ignore[no-untyped-def]
            if fault.write and fault.state == ZERO:
                writes.append(fault.segment)
            return original(fault, agent)

        c.policy.handle_fault = counting  # type: ignore[method-assign]
        await s.agent.write(v.id, 0, block("first"))
        assert writes == [0], "the first write asks the controller and is handed a grant"
        granted = list(s.agent.volumes[v.id].grant)
        assert len(granted) == c.policy.grant_segments
        for seg in range(1, 1 + len(granted)):
            await s.agent.write(v.id, seg * 2048 * 3, block(f"g{seg}"))  # scattered: not the allocate-ahead pattern
        assert writes == [0], "writes within the grant map segments with no fault"
        assert len(c.mappings(v.id, 0, 128)) == 1, "granted mappings are reported later, not per write"
        await s.agent.flush()
        mappings = c.mappings(v.id, 0, 128)
        assert len(mappings) == 1 + len(granted)
        assert {(m.container_id, m.pseg) for m in mappings[1:]} == set(granted)
        assert c.allocated_bytes(v) == len(mappings) * MIB
        for seg in range(1, 1 + len(granted)):
            assert bytes(await s.agent.read(v.id, seg * 2048 * 3, 1)) == block(f"g{seg}")

    run(str(tmp_path), body)
    assert check_store(str(tmp_path / "san.db"))[0] == []


def test_granted_mappings_are_reported_on_a_timer(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 32 * MIB)
        await asyncio.sleep(0.1)
        await s.agent.write(v.id, 0, block("a"))
        await s.agent.write(v.id, 2048, block("b"))
        assert len(c.mappings(v.id, 0, 32)) == 1
        await asyncio.sleep(0.5)
        assert [m.vseg for m in c.mappings(v.id, 0, 32)] == [0, 1]

    run(str(tmp_path), body)


def test_allocated_reports_outside_the_grant_are_refused(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 32 * MIB)
        await asyncio.sleep(0.1)
        await s.agent.write(v.id, 0, block("a"))
        container, pseg = next(iter(c.policy.grants[v.id]))
        used = c.mappings(v.id, 0, 1)[0]
        for entries in (
            ((1, used.container_id, used.pseg),),  # a segment already mapped, not granted
            ((1, container, pseg), (2, container, pseg)),  # one granted segment twice
            ((0, container, pseg),),  # a vdisk segment already mapped
            ((32, container, pseg),),  # past the end of the vdisk
        ):
            response = await c.handle(Allocated(v.id, entries), LOCAL_AGENT)
            assert response.action is Action.FAIL and response.reason is Reason.BAD_COMMAND, entries
        assert (await c.handle(Allocated(999, ((1, container, pseg),)), LOCAL_AGENT)).reason is Reason.NO_VDISK
        assert [m.vseg for m in c.mappings(v.id, 0, 32)] == [0], "a refused report changes nothing"
        assert (container, pseg) in c.policy.grants[v.id]

    run(str(tmp_path), body)


def test_deleting_a_vdisk_returns_its_grant_to_the_pool(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        pool = await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 32 * MIB)
        await asyncio.sleep(0.1)
        await s.agent.write(v.id, 0, block("a"))
        await s.agent.write(v.id, 2048, block("b"))
        assert c.policy.grants[v.id]
        await c.delete_vdisk("v")
        allocator = c.allocators[pool.id]
        assert not allocator.granted and v.id not in c.policy.grants
        assert allocator.used == 0 and c.usage(pool).used_bytes == 0

    run(str(tmp_path), body)
    assert check_store(str(tmp_path / "san.db"))[0] == []


def test_unmap_gives_whole_segments_back_once_committed(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        pool = await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 32 * MIB)
        for seg in range(4):
            await s.agent.write(v.id, seg * 2048, block(f"seg{seg}") * 2048)
        await s.agent.flush()
        allocator = c.allocators[pool.id]
        used = allocator.used
        await s.agent.unmap(v.id, 0, 2 * 2048 + 100)
        assert allocator.used == used, "unmapped segments wait for the metadata commit before they are free"
        mapped = [m.vseg for m in c.mappings(v.id, 0, 32)]
        assert mapped[:2] == [2, 3], "segments 0 and 1 are unmapped, 2 is only partly covered"
        await s.agent.flush()
        assert allocator.used == used - 2
        assert bytes(await s.agent.read(v.id, 0, 2 * 2048 + 100)) == bytes((2 * 2048 + 100) * 512)
        assert bytes(await s.agent.read(v.id, 2 * 2048 + 100, 1)) == block("seg2")
        runs = await s.agent.provisioning(v.id, 0, 8)
        assert runs[0] == (0, 2 * 2048, False) and runs[1] == (2 * 2048, len(mapped) * 2048, True), runs
        await s.agent.unmap(v.id, 0, v.nblocks)
        await s.agent.flush()
        assert c.allocated_bytes(v) == 0 and allocator.used == used - 2 - len(mapped)

    run(str(tmp_path), body)
    assert check_store(str(tmp_path / "san.db"))[0] == []


def test_unmap_survives_a_restart_only_once_flushed(tmp_path: Path) -> None:
    ids: dict[str, int] = {}

    async def first(s: Service) -> None:
        await s.controller.create_pool("p", 64 * MIB)
        v = await s.controller.create_vdisk("v", "p", 16 * MIB)
        ids["v"] = v.id
        await s.agent.write(v.id, 0, block("keep") * 2048)
        await s.agent.flush()
        await s.agent.unmap(v.id, 0, 2048)
        await s.agent.flush()

    async def second(s: Service) -> None:
        assert bytes(await s.agent.read(ids["v"], 0, 1)) == bytes(512)
        assert s.controller.mappings(ids["v"], 0, 16) == []

    run(str(tmp_path), first)
    run(str(tmp_path), second)


def test_reads_that_would_wait_for_the_disk_run_in_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threaded: list[str] = []  # the threads that read without nowait (that may wait for the disk)

    async def body(s: Service) -> None:
        c = s.controller
        pool = await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 16 * MIB)
        await s.agent.write(v.id, 4096, block("cold") * 16)
        await s.agent.flush()
        real = s.agent._read_into

        def watched(volume, lba, nblocks, buffer, nowait, arrived=0):  # type: ignore[no-untyped-def]
            if not nowait:
                threaded.append(threading.current_thread().name)
            return real(volume, lba, nblocks, buffer, nowait, arrived)

        monkeypatch.setattr(s.agent, "_read_into", watched)
        assert bytes(await s.agent.read(v.id, 4096, 16)) == block("cold") * 16
        assert threaded == [], "cached data is read in place"
        fd = s.agent.containers.fd(c.pool_containers(pool)[0].id)
        for _ in range(50):  # the kernel may keep pages still under writeback: drop them until they are gone
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if s.agent.read_now(v.id, 4096, 16) is None:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the fast path does not wait for a disk: it read uncached data in place")
        assert bytes(await s.agent.read(v.id, 4096, 16)) == block("cold") * 16
        assert threaded and threading.main_thread().name not in threaded, threaded

    run(str(tmp_path), body)


def test_a_write_during_an_unmap_waits_and_gets_a_new_segment(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 16 * MIB)
        await s.agent.write(v.id, 0, block("old") * 2048)
        await s.agent.flush()
        before = c.mappings(v.id, 0, 1)[0]
        table = s.agent.volumes[v.id].table
        slot = table.io_start()  # an I/O still in flight holds the unmap at its barrier
        unmap = asyncio.ensure_future(s.agent.unmap(v.id, 0, 2048))
        await asyncio.sleep(0.05)
        write = asyncio.ensure_future(s.agent.write(v.id, 5, block("new")))
        await asyncio.sleep(0.05)
        assert not unmap.done() and not write.done(), "the write waits until the segment has been given back"
        table.io_end(slot)
        await unmap
        await write
        await s.agent.flush()
        after = c.mappings(v.id, 0, 1)[0]
        assert (after.container_id, after.pseg) != (before.container_id, before.pseg)
        assert bytes(await s.agent.read(v.id, 0, 6)) == bytes(5 * 512) + block("new")

    run(str(tmp_path), body)
    assert check_store(str(tmp_path / "san.db"))[0] == []
