"""One owner for the metadata transaction: a management change whose commit fails undoes only itself; the agents'
pending changes (allocations, unmaps) stay pending, and unmapped segments are free only once a commit is durable.

The failures are real: the data directory sits on a small tmpfs that is filled up just before the commit."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from storage_faults import metadata_full, small_filesystem

from san.agent.agent import AgentIOError
from san.errors import StoreFailure
from san.protocol.messages import Reason
from san.service import Service
from san.store.check import check_store
from san.store.metadata import Metadata
from san.store.sqlite import SQLiteStore
from san.store.store import Mapping, StoreError

MIB = 1 << 20
SEGMENT_BLOCKS = 2048
Body = Callable[[Service], Awaitable[None]]


def run(data: Path, body: Body, **options: object) -> None:
    async def main() -> None:
        service = Service(str(data), **options)  # type: ignore[arg-type]
        await service.start()
        try:
            await body(service)
        finally:
            await service.stop()

    asyncio.run(main())


def block(tag: str) -> bytes:
    return tag.encode().ljust(512, b".")


# -- the metadata object alone, on a real store ------------------------------------------------------------


@pytest.fixture
def metadata(tmp_path: Path) -> tuple[Metadata, list[tuple[int, int]]]:
    store = SQLiteStore(str(tmp_path / "san.db"))
    freed: list[tuple[int, int]] = []
    meta = Metadata(store, freed.extend)
    meta.commit(lambda s: (s.add_pool("p", MIB, 80, 4), s.add_vdisk("v", 1, 64 * MIB, 512, True, "ready")))
    store.db.execute("PRAGMA foreign_keys=OFF")  # mappings to container 1 without creating the container's file
    return meta, freed


def test_changes_are_visible_at_once_and_durable_at_commit(metadata: tuple[Metadata, list[tuple[int, int]]]) -> None:
    meta, freed = metadata
    meta.insert(1, [Mapping(0, 1, 10, 0), Mapping(5, 1, 11, 0)])
    assert [m.pseg for m in meta.find(1, 0, 64)] == [10, 11] and meta.count(1) == 2
    assert meta.store.count_mappings(1) == 0, "nothing is in the store before a commit"
    meta.commit()
    assert meta.store.count_mappings(1) == 2 and meta.pending == 0
    meta.remove(1, 0, 1)
    assert [m.vseg for m in meta.find(1, 0, 64)] == [5] and meta.count(1) == 1
    assert freed == [], "an unmapped segment is not free before the commit that unmaps it"
    meta.commit()
    assert freed == [(1, 10)] and meta.store.count_mappings(1) == 1


def test_a_failed_change_keeps_the_pending_ones(metadata: tuple[Metadata, list[tuple[int, int]]]) -> None:
    meta, freed = metadata
    meta.insert(1, [Mapping(0, 1, 10, 0)])
    meta.commit()
    meta.remove(1, 0, 1)
    meta.insert(1, [Mapping(3, 1, 12, 0)])

    def broken(store: SQLiteStore) -> None:
        store.add_host("h", "iqn.2024-01.org.example:h", ("", "", "", ""))
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(StoreFailure):
        meta.commit(broken)
    assert meta.store.hosts() == [], "the failed change left nothing"
    assert [(m.vseg, m.pseg) for m in meta.store.mappings(1, 0, 64)] == [(0, 10)], "nor did the pending ones"
    assert freed == [] and meta.pending == 2
    assert [(m.vseg, m.pseg) for m in meta.find(1, 0, 64)] == [(3, 12)], "the view still shows them"
    meta.commit()
    assert [(m.vseg, m.pseg) for m in meta.store.mappings(1, 0, 64)] == [(3, 12)] and freed == [(1, 10)]


def test_a_mapping_removed_before_its_commit_is_freed_after_the_next(metadata: tuple[Metadata, list[tuple[int, int]]]) -> None:
    meta, freed = metadata
    meta.insert(1, [Mapping(7, 1, 20, 0)])
    meta.remove(1, 0, 64)
    assert freed == [] and meta.find(1, 0, 64) == []
    meta.commit()
    assert freed == [(1, 20)] and meta.store.count_mappings(1) == 0


class Gate:
    """Holds the store's COMMIT (the fsync) in the metadata thread until opened: a slow disk, at the one call that
    waits for it. With error, the commit fails once opened."""

    def __init__(self, meta: Metadata, error: Exception | None = None) -> None:
        self.store = meta.store
        self.real = meta.store.commit
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.error = error
        self.thread = ""
        meta.store.commit = self.commit  # type: ignore[method-assign]

    def commit(self) -> None:
        self.thread = threading.current_thread().name
        self.entered.set()
        self.opened.wait(10)
        self.store.commit = self.real  # type: ignore[method-assign]
        if self.error is not None:
            raise self.error
        self.real()

    async def wait(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10), "the commit never started"


def test_a_flush_commits_in_a_thread_while_the_loop_goes_on(metadata: tuple[Metadata, list[tuple[int, int]]]) -> None:
    meta, freed = metadata

    async def body() -> None:
        meta.insert(1, [Mapping(0, 1, 10, 0), Mapping(1, 1, 11, 0)])
        gate = Gate(meta)
        flushing = asyncio.ensure_future(meta.flush())
        await gate.wait()
        assert gate.thread.startswith("metadata"), "the commit runs in the metadata thread, not on the loop"
        # The loop serves on while the commit waits for its fsync: the mappings in flight are seen, new changes made.
        assert [m.pseg for m in meta.find(1, 0, 64)] == [10, 11] and meta.count(1) == 2
        assert meta.store.count_mappings(1) == 0, "a read on the loop sees the last commit, without waiting"
        meta.remove(1, 1, 2)
        meta.insert(1, [Mapping(2, 1, 12, 0)])
        assert [m.vseg for m in meta.find(1, 0, 64)] == [0, 2] and meta.count(1) == 2
        assert not flushing.done()
        gate.opened.set()
        await flushing
        assert [m.vseg for m in meta.store.mappings(1, 0, 64)] == [0, 1] and meta.pending == 2 and freed == []
        await meta.flush()
        assert [m.vseg for m in meta.store.mappings(1, 0, 64)] == [0, 2] and freed == [(1, 11)]

    asyncio.run(body())


def test_a_failed_flush_keeps_its_changes_under_the_later_ones(metadata: tuple[Metadata, list[tuple[int, int]]]) -> None:
    meta, freed = metadata

    async def body() -> None:
        meta.insert(1, [Mapping(0, 1, 10, 0), Mapping(1, 1, 11, 0)])
        gate = Gate(meta, sqlite3.OperationalError("disk I/O error"))
        flushing = asyncio.ensure_future(meta.flush())
        await gate.wait()
        meta.remove(1, 1, 2)  # a mapping in flight, unmapped meanwhile: it never reaches the store
        meta.insert(1, [Mapping(2, 1, 12, 0)])
        gate.opened.set()
        with pytest.raises(StoreFailure):
            await flushing
        assert meta.store.count_mappings(1) == 0 and meta.failures == 1
        assert [m.vseg for m in meta.find(1, 0, 64)] == [0, 2], "the view is what the agents did, in order"
        assert freed == [], "nothing is free before a commit"
        await meta.flush()
        assert [(m.vseg, m.pseg) for m in meta.store.mappings(1, 0, 64)] == [(0, 10), (2, 12)]
        assert freed == [(1, 11)], "the segment mapped in flight and unmapped meanwhile goes back once"

    asyncio.run(body())


def test_a_management_commit_lands_the_flush_in_flight_first(metadata: tuple[Metadata, list[tuple[int, int]]]) -> None:
    meta, _ = metadata

    async def body() -> None:
        meta.insert(1, [Mapping(0, 1, 10, 0)])
        gate = Gate(meta)
        flushing = asyncio.ensure_future(meta.flush())
        await gate.wait()
        meta.insert(1, [Mapping(4, 1, 14, 0)])
        threading.Timer(0.2, gate.opened.set).start()
        meta.commit(lambda store: store.add_host("h", "iqn.2024-01.org.example:h", ("", "", "", "")))
        assert [m.vseg for m in meta.store.mappings(1, 0, 64)] == [0, 4] and [h.name for h in meta.store.hosts()] == ["h"]
        await flushing
        assert meta.pending == 0 and meta.flight is None

    asyncio.run(body())


def test_the_store_refuses_writes_outside_the_transaction(metadata: tuple[Metadata, list[tuple[int, int]]]) -> None:
    meta, _ = metadata
    with pytest.raises(StoreError):
        meta.store.add_host("h", "iqn.2024-01.org.example:h", ("", "", "", ""))


def test_only_the_metadata_object_ends_a_transaction() -> None:
    san = Path(__file__).resolve().parent.parent / "san"
    pattern = re.compile(r"\bstore\.(begin|commit|rollback)\(")
    offenders = [
        f"{path.relative_to(san.parent)}:{number}"
        for path in san.rglob("*.py")
        if path.name not in ("metadata.py", "sqlite.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == [], f"only san/store/metadata.py may begin, commit or roll back: {offenders}"


# -- the sequences that once lost data -----------------------------------------------------------------------


def test_a_failed_zoning_commit_after_an_unmap_gives_nothing_away(tmp_path: Path) -> None:
    """The original sequence: an UNMAP, then a zoning change whose commit failed. It rolled back the whole open
    transaction while the controller still counted the unmapped segments as freeing; the next commit gave them to
    another vdisk, and after a restart the unmapped vdisk read that vdisk's bytes."""
    pools = tmp_path / "pools"
    pools.mkdir()
    ids: dict[str, int] = {}
    with small_filesystem(tmp_path / "meta", "16m") as meta:
        data = meta / "data"

        async def first(s: Service) -> None:
            c = s.controller
            pool = await c.create_pool("p", 64 * MIB, path=str(pools / "p.img"))
            a = await c.create_vdisk("a", "p", 16 * MIB)
            b = await c.create_vdisk("b", "p", 16 * MIB)
            ids.update(a=a.id, b=b.id)
            await c.zoning.create_host("h", "iqn.2024-01.org.example:h")
            for seg in range(4):
                await s.agent.write(a.id, seg * SEGMENT_BLOCKS, block(f"a{seg}") * SEGMENT_BLOCKS)
            await s.agent.flush()
            allocator = c.allocators[pool.id]
            used = allocator.used
            await s.agent.unmap(a.id, 0, 2 * SEGMENT_BLOCKS)
            with metadata_full(data):
                with pytest.raises(StoreFailure):
                    await c.zoning.add("h", "a")
                assert c.zoning.zones == [] and c.store.zones() == []
                assert allocator.used == used, "the unmapped segments stay this vdisk's until the unmap is durable"
                with pytest.raises(AgentIOError) as failed:
                    await s.agent.flush()
                assert failed.value.reason is Reason.NO_SPACE, "a full metadata file system is said as such"
            await s.agent.flush()
            assert allocator.used == used - 2, "the next commit makes the unmap durable and frees its segments"
            for seg in range(4):
                await s.agent.write(b.id, seg * SEGMENT_BLOCKS, block(f"b{seg}") * SEGMENT_BLOCKS)
            await s.agent.flush()
            await c.zoning.add("h", "a")

        async def after_restart(s: Service) -> None:
            for seg in range(4):
                a = bytes(await s.agent.read(ids["a"], seg * SEGMENT_BLOCKS, 1))
                assert a == (bytes(512) if seg < 2 else block(f"a{seg}")), (seg, a[:8])
                assert bytes(await s.agent.read(ids["b"], seg * SEGMENT_BLOCKS, 1)) == block(f"b{seg}")
            assert [z.lun for z in s.controller.zoning.zones] == [0]

        run(data, first, allow_paths=(str(pools),))
        assert check_store(str(data / "san.db"))[0] == []
        run(data, after_restart)
        assert check_store(str(data / "san.db"))[0] == []


def test_failed_management_commits_undo_only_themselves(tmp_path: Path) -> None:
    """Pool and vdisk creation, grow and delete, each with a commit that fails: each leaves nothing behind, the
    pending unmap survives them all, and every vdisk keeps its data."""
    pools = tmp_path / "pools"
    pools.mkdir()
    with small_filesystem(tmp_path / "meta", "16m") as meta:
        data = meta / "data"

        async def body(s: Service) -> None:
            c = s.controller
            pool = await c.create_pool("p", 64 * MIB, path=str(pools / "p.img"))
            a = await c.create_vdisk("a", "p", 16 * MIB)
            await asyncio.sleep(0.2)  # the reserve fills: the first allocation brings a grant
            for seg in range(3):
                await s.agent.write(a.id, seg * SEGMENT_BLOCKS, block(f"a{seg}") * SEGMENT_BLOCKS)
            await s.agent.flush()
            await s.agent.unmap(a.id, 0, SEGMENT_BLOCKS)
            await s.agent.write(a.id, 5 * SEGMENT_BLOCKS, block("unflushed"))  # mapped from the grant, not reported
            assert s.agent.volumes[a.id].unreported
            allocator = c.allocators[pool.id]
            used = allocator.used
            before = (c.store.pools(), c.store.vdisks(), c.store.containers())
            with metadata_full(data):
                with pytest.raises(StoreFailure):
                    await c.create_pool("q", 8 * MIB, path=str(pools / "q.img"))
                assert not (pools / "q.img").exists(), "the new pool file is removed again"
                with pytest.raises(StoreFailure):
                    await c.create_vdisk("thin", "p", 8 * MIB)
                with pytest.raises(StoreFailure):
                    await c.create_vdisk("thick", "p", 8 * MIB, thin=False)
                with pytest.raises(StoreFailure):
                    await c.grow_vdisk("a", 32 * MIB)
                assert allocator.used == used
                with pytest.raises(StoreFailure):
                    await c.delete_vdisk("a")
                assert (c.store.pools(), c.store.vdisks(), c.store.containers()) == before
                assert allocator.used == used + 1, "the agent reported its grant mapping before dropping the table"
                assert [p.name for p in c.pools.values()] == ["p"]
                assert sorted(v.name for v in c.vdisks.values()) == ["a"] and a.size_bytes == 16 * MIB
                assert bytes(await s.agent.read(a.id, SEGMENT_BLOCKS, 1)) == block("a1"), "a failed delete keeps the vdisk"
                assert bytes(await s.agent.read(a.id, 5 * SEGMENT_BLOCKS, 1)) == block("unflushed"), "and its newest write"
            await s.agent.flush()
            assert allocator.used == used - 1 + 1, "the unmap freed one, the reported grant mapping holds one"
            assert bytes(await s.agent.read(a.id, 0, 1)) == bytes(512)
            assert bytes(await s.agent.read(a.id, 2 * SEGMENT_BLOCKS, 1)) == block("a2")
            await c.grow_vdisk("a", 32 * MIB)
            await c.create_vdisk("thick", "p", 8 * MIB, thin=False)

        run(data, body, allow_paths=(str(pools),))
        assert check_store(str(data / "san.db"))[0] == []
