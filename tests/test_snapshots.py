"""Snapshots in one process (controller and agent, through the in-process link and through mutual TLS): a snapshot's
content never changes, a write into a shared segment copies only its own blocks, a deleted snapshot's segments are
written in place again; and a random mix of writes, unmaps, snapshots, deletes and restarts against a plain model.

Real sparse files under a temporary data directory; every check reads back through the agent."""

import asyncio
import itertools
import random
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from san.agent.agent import AgentIOError
from san.errors import Conflict, InvalidRequest
from san.model import MIB
from san.protocol.messages import Reason
from san.service import Service
from san.store.check import check_store

Body = Callable[[Service], Awaitable[None]]
LINK: dict[str, str | None] = {"network": None}
RUNS = itertools.count()
BLOCK = 512
SEGMENT_BLOCKS = MIB // BLOCK


@pytest.fixture(autouse=True, params=["in-process", "tls"])
def link(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    LINK["network"] = str(tmp_path_factory.mktemp("cluster") / "certs") if request.param == "tls" else None
    yield
    LINK["network"] = None


async def started(data: str) -> Service:
    base = LINK["network"]
    service = Service(data, network=f"{base}-{next(RUNS)}" if base is not None else None)
    await service.start()
    return service


def run(data: str, body: Body) -> None:
    async def main() -> None:
        service = await started(data)
        try:
            await body(service)
        finally:
            await service.stop()

    asyncio.run(main())


def block(tag: str, size: int = BLOCK) -> bytes:
    return tag.encode().ljust(size, b".")


def rows(data: Path, name: str) -> list[tuple[int, int, int, int, bytes | None]]:
    """The committed mappings of a vdisk: (vseg, pseg, alt container, alt pseg, bitmap)."""
    with sqlite3.connect(data / "san.db") as db:
        return db.execute(
            "SELECT vseg, pseg, alt_container, alt_pseg, bitmap FROM mapping m JOIN vdisk v ON v.id = m.vdisk_id"
            " WHERE v.name = ? ORDER BY vseg",
            (name,),
        ).fetchall()


def assert_clean(data: Path) -> None:
    problems, _ = check_store(str(data / "san.db"))
    assert problems == [], problems


def test_a_snapshot_keeps_its_content_while_the_vdisk_is_written(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 8 * MIB)
        await s.agent.write(v.id, 0, block("old") * (3 * SEGMENT_BLOCKS))
        await s.agent.flush()
        snap = await c.snapshots.create("v@one")
        assert snap.name == "v@one" and snap.origin == v.id and snap.size_bytes == v.size_bytes
        await s.agent.write(v.id, 10, block("new") * 8)  # inside a shared segment
        await s.agent.write(v.id, SEGMENT_BLOCKS - 4, block("edge") * 8)  # across two shared segments
        await s.agent.write(v.id, 5 * SEGMENT_BLOCKS, block("fresh") * 2)  # where nothing was: no sharing
        live = bytes(await s.agent.read(v.id, 0, 6 * SEGMENT_BLOCKS))
        expected = bytearray(block("old") * (3 * SEGMENT_BLOCKS) + bytes(3 * MIB))
        expected[10 * BLOCK : 18 * BLOCK] = block("new") * 8
        expected[(SEGMENT_BLOCKS - 4) * BLOCK : (SEGMENT_BLOCKS + 4) * BLOCK] = block("edge") * 8
        expected[5 * MIB : 5 * MIB + 2 * BLOCK] = block("fresh") * 2
        assert live == bytes(expected)
        old = block("old") * (3 * SEGMENT_BLOCKS) + bytes(3 * MIB)
        assert bytes(await s.agent.read(snap.id, 0, 6 * SEGMENT_BLOCKS)) == old, "the snapshot did not change"
        with pytest.raises(AgentIOError) as refused:
            await s.agent.write(snap.id, 0, block("x"))
        assert refused.value.reason is Reason.WRITE_PROTECTED
        await s.agent.flush()

    run(str(tmp_path), body)
    assert_clean(tmp_path)
    shared = [r for r in rows(tmp_path, "v") if r[4] is not None]
    assert [r[0] for r in shared] == [0, 1], "the two written shared segments have an alternate location, no other"
    written = [bin(int.from_bytes(r[4] or b"", "little")).count("1") for r in shared]
    assert written == [8 + 4, 4], "only the blocks written are in the alternate locations"

    async def again(s: Service) -> None:  # after a restart, both read the same
        v, snap = s.controller.vdisk("v"), s.controller.vdisk("v@one")
        assert bytes(await s.agent.read(snap.id, 0, 2 * SEGMENT_BLOCKS)) == block("old") * (2 * SEGMENT_BLOCKS)
        assert bytes(await s.agent.read(v.id, 10, 8)) == block("new") * 8
        assert bytes(await s.agent.read(v.id, 0, 10)) == block("old") * 10

    run(str(tmp_path), again)


def test_a_copy_on_write_writes_only_the_blocks_written(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 4 * MIB)
        await s.agent.write(v.id, 0, block("base") * SEGMENT_BLOCKS)
        await c.snapshots.create("v@s")
        await s.agent.write(v.id, 64, block("cow") * 8, fua=True)
        await s.agent.write(v.id, 64, block("again") * 8, fua=True)  # the same blocks: in the alternate, in place

    run(str(tmp_path), body)
    (_, pseg, _, alt_pseg, bitmap), *_ = rows(tmp_path, "v")
    assert bitmap is not None and int.from_bytes(bitmap, "little") == 0xFF << 64
    image = next((tmp_path / "pools").iterdir()).read_bytes()
    alternate = image[alt_pseg * MIB : (alt_pseg + 1) * MIB]
    assert alternate[64 * BLOCK : 72 * BLOCK] == block("again") * 8
    assert alternate[: 64 * BLOCK] + alternate[72 * BLOCK :] == bytes(MIB - 8 * BLOCK), "nothing else was copied"
    assert image[pseg * MIB : pseg * MIB + BLOCK] == block("base"), "the shared segment is untouched"


def test_a_deleted_snapshots_segments_are_written_in_place_again(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 4 * MIB)
        await s.agent.write(v.id, 0, block("base") * (2 * SEGMENT_BLOCKS))
        snap = await c.snapshots.create("v@s")
        await s.agent.write(v.id, 0, block("cow"))
        with pytest.raises(Conflict):
            await c.delete_vdisk("v")  # it has a snapshot
        used = c.allocators[v.pool_id].used
        await c.snapshots.delete("v@s")
        while c.snapshots.reclaims:
            await asyncio.sleep(0.05)
        assert snap.id not in c.vdisks
        assert c.allocators[v.pool_id].used == used, "segment 0 is the vdisk's own again, segment 1 too"
        await s.agent.write(v.id, SEGMENT_BLOCKS, block("in place"))
        await s.agent.flush()
        assert bytes(await s.agent.read(v.id, 0, 1)) == block("cow")
        assert bytes(await s.agent.read(v.id, 1, 1)) == block("base")
        assert bytes(await s.agent.read(v.id, SEGMENT_BLOCKS, 1)) == block("in place")

    run(str(tmp_path), body)
    assert_clean(tmp_path)
    assert rows(tmp_path, "v")[1][4] is None, "no copy on write once nothing shares the segment"


def test_snapshots_are_read_only_and_named_after_their_vdisk(tmp_path: Path) -> None:
    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 64 * MIB)
        await c.create_vdisk("v", "p", 4 * MIB)
        await c.snapshots.create("v@a")
        for bad in ("v", "v@", "@a", "v@bad name", "nope@a"):
            with pytest.raises((InvalidRequest, LookupError, Exception)):
                await c.snapshots.create(bad)
        with pytest.raises(Conflict):
            await c.snapshots.create("v@a")
        with pytest.raises(InvalidRequest):
            await c.snapshots.create("v@a@b")
        host = await c.zoning.create_host("h", "iqn.2024-01.org.example:h")
        with pytest.raises(InvalidRequest, match="read-only"):
            await c.zoning.add(host.name, "v@a")
        await c.zoning.add(host.name, "v@a", read_only=True)
        with pytest.raises(InvalidRequest):
            await c.zoning.modify(host.name, "v@a", read_only=False)
        with pytest.raises(Conflict):
            await c.snapshots.delete("v@a")  # zoned
        await c.rename_vdisk("v", "w")
        assert c.vdisk("w@a").origin == c.vdisk("w").id
        with pytest.raises(InvalidRequest):
            await c.grow_vdisk("w@a", 8 * MIB)

    run(str(tmp_path), body)
    assert_clean(tmp_path)


def test_a_thousand_snapshots_of_one_vdisk_each_keep_their_block(tmp_path: Path) -> None:
    count = 1030

    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 2048 * MIB)  # each snapshot keeps its own copy of the blocks written after it
        v = await c.create_vdisk("v", "p", 4 * MIB)
        for i in range(count):
            await s.agent.write(v.id, 7, block(f"gen {i}"))
            await c.snapshots.create(f"v@s{i}")
        snaps = c.snapshots.of(v)
        assert len(snaps) == count
        for i in random.Random(1).sample(range(count), 40):
            assert bytes(await s.agent.read(c.vdisk(f"v@s{i}").id, 7, 1)) == block(f"gen {i}")

    run(str(tmp_path), body)
    assert_clean(tmp_path)


def test_random_writes_unmaps_snapshots_deletes_and_restarts_match_a_model(tmp_path: Path) -> None:
    """A plain model: each image (the vdisk and every snapshot) as a dict of block -> content."""
    rng = random.Random(12)
    nblocks = 4 * SEGMENT_BLOCKS
    live: dict[int, bytes] = {}
    snapshots: dict[str, dict[int, bytes]] = {}
    names = itertools.count()

    def expected(image: dict[int, bytes], lba: int, n: int) -> bytes:
        return b"".join(image.get(b, bytes(BLOCK)) for b in range(lba, lba + n))

    async def main() -> None:
        s = await started(str(tmp_path))
        c = s.controller
        await c.create_pool("p", 128 * MIB)
        await c.create_vdisk("v", "p", nblocks * BLOCK)
        try:
            for step in range(300):
                op = rng.random()
                if op < 0.45:
                    lba = rng.randrange(nblocks)
                    n = rng.randint(1, min(64, nblocks - lba))
                    data = b"".join(block(f"{step}:{lba + i}") for i in range(n))
                    await s.agent.write(c.vdisk("v").id, lba, data, fua=rng.random() < 0.2)
                    live.update({lba + i: data[i * BLOCK : (i + 1) * BLOCK] for i in range(n)})
                elif op < 0.5:
                    first = rng.randrange(4) * SEGMENT_BLOCKS
                    await s.agent.unmap(c.vdisk("v").id, first, SEGMENT_BLOCKS)
                    for b in range(first, first + SEGMENT_BLOCKS):
                        live.pop(b, None)
                elif op < 0.6 and len(snapshots) < 12:
                    name = f"v@s{next(names)}"
                    await c.snapshots.create(name)
                    snapshots[name] = dict(live)
                elif op < 0.67 and snapshots:
                    name = rng.choice(sorted(snapshots))
                    await c.snapshots.delete(name)
                    del snapshots[name]
                elif op < 0.72:
                    await s.agent.flush()
                    await s.stop()
                    s = await started(str(tmp_path))
                    c = s.controller
                else:
                    name = rng.choice(["v", *sorted(snapshots)])
                    image = live if name == "v" else snapshots[name]
                    lba = rng.randrange(nblocks)
                    n = rng.randint(1, min(2 * SEGMENT_BLOCKS, nblocks - lba))
                    got = bytes(await s.agent.read(c.vdisk(name).id, lba, n))
                    assert got == expected(image, lba, n), f"step {step}: {name} blocks {lba}+{n}"
            for name, image in [("v", live), *snapshots.items()]:
                got = bytes(await s.agent.read(c.vdisk(name).id, 0, nblocks))
                assert got == expected(image, 0, nblocks), f"{name} as a whole"
            await s.agent.flush()
            while c.snapshots.reclaims:
                await asyncio.sleep(0.05)
        finally:
            await s.stop()

    asyncio.run(main())
    assert_clean(tmp_path)
