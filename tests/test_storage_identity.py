"""Storage identity: containers are known by the label san writes into them, held exclusively while served, and a
thick vdisk's space really exists. Real loop devices, real copies of data directories, a real small file system.

Each test replays what once destroyed data: a loop device pointed at another image and served as the vdisk, one
storage taken by two pools, mkfs on a served device, a copied data directory writing into the original's pool file,
and a thick vdisk on a sparse file that ran out of space after it was accepted."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from storage_faults import fill, small_filesystem

from san.errors import Conflict, NoSpace
from san.service import Service
from san.store.check import check_store

MIB = 1 << 20
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


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def block(tag: str) -> bytes:
    return tag.encode().ljust(512, b".")


class Loops:
    """Loop devices made by a test, detached at its end."""

    def __init__(self) -> None:
        self.devices: list[str] = []

    def attach(self, image: Path, device: str | None = None) -> str:
        args = ["losetup", device, str(image)] if device else ["losetup", "-f", "--show", str(image)]
        made = subprocess.run(args, capture_output=True, text=True, check=False)
        if made.returncode != 0:
            pytest.skip(f"no loop device here (needs root and /dev/loop-control): {made.stderr.strip()}")
        device = device or made.stdout.strip()
        self.devices.append(device)
        return device

    def detach(self, device: str) -> None:
        subprocess.run(["losetup", "-d", device], check=True)
        self.devices.remove(device)


@pytest.fixture
def loops() -> Iterator[Loops]:
    made = Loops()
    try:
        yield made
    finally:
        for device in list(made.devices):
            subprocess.run(["losetup", "-d", device], check=False)


def test_a_loop_device_pointed_at_another_image_is_not_served(tmp_path: Path, loops: Loops) -> None:
    pool_image, other_image = tmp_path / "pool.img", tmp_path / "other.img"
    pool_image.write_bytes(b"\xee" * (32 * MIB))
    other_image.write_bytes(b"\xbb" * (32 * MIB))
    other = sha(other_image)
    data = tmp_path / "data"
    device = loops.attach(pool_image)

    async def make(s: Service) -> None:
        c = s.controller
        await c.create_pool("dev", path=device)
        v = await c.create_vdisk("v", "dev", 8 * MIB)
        await s.agent.write(v.id, 5, block("kept"), fua=True)

    run(data, make)
    loops.detach(device)
    loops.attach(other_image, device)  # the same device name, another image behind it

    async def swapped(s: Service) -> None:
        c = s.controller
        pool = c.pool("dev")
        assert pool.id in c.offline and "no san label" in c.offline[pool.id], c.offline
        vdisk = c.vdisk("v")
        assert c.vdisk_state(vdisk) == "offline" and vdisk.id not in s.agent.volumes, "nothing of it is served"

    run(data, swapped)
    assert sha(other_image) == other, "the other image was never written"
    problems, _ = check_store(str(data / "san.db"))
    assert any("no san label" in p for p in problems), problems
    moved = loops.attach(pool_image)  # the pool's image under another device name: found by its label

    async def found(s: Service) -> None:
        c = s.controller
        assert c.offline == {}
        assert c.pool_containers(c.pool("dev"))[0].path == moved
        assert bytes(await s.agent.read(c.vdisk("v").id, 5, 1)) == block("kept")

    run(data, found)
    assert sha(other_image) == other
    assert check_store(str(data / "san.db"))[0] == []


def test_one_storage_never_backs_two_pools_and_is_held_while_served(tmp_path: Path, loops: Loops) -> None:
    backing = tmp_path / "shared.img"
    backing.write_bytes(bytes(32 * MIB))
    os.chmod(backing, 0o600)
    device = loops.attach(backing)

    async def body(s: Service) -> None:
        c = s.controller
        await c.create_pool("on-device", path=device)
        with pytest.raises(Conflict, match="already holds container"):
            await c.create_pool("on-file", path=str(backing), existing=True)
        v = await c.create_vdisk("v", "on-device", 8 * MIB)
        await s.agent.write(v.id, 0, block("mine"), fua=True)
        with pytest.raises(OSError) as held:
            os.close(os.open(device, os.O_RDONLY | os.O_EXCL))
        assert held.value.errno == errno.EBUSY
        mkfs = subprocess.run(["mkfs.ext4", "-q", "-F", device], capture_output=True, text=True, check=False)
        assert mkfs.returncode != 0, "mkfs must not format a device san serves"
        assert bytes(await s.agent.read(v.id, 0, 1)) == block("mine")
        await c.delete_vdisk("v")
        await c.delete_pool("on-device")
        # The other way round: the file first, then the loop device over it.
        await c.create_pool("on-file", path=str(backing), existing=True)
        with pytest.raises(Conflict, match="already"):
            await c.create_pool("on-device", path=device)

    run(tmp_path / "data", body, allow_paths=(str(tmp_path),))
    assert check_store(str(tmp_path / "data" / "san.db"))[0] == []


def test_a_copied_data_directory_uses_its_own_pool_files(tmp_path: Path) -> None:
    original, copy = tmp_path / "data", tmp_path / "copy"
    ids: dict[str, int] = {}

    async def make(s: Service) -> None:
        c = s.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 32 * MIB)
        ids["v"] = v.id
        for seg in range(8):
            await s.agent.write(v.id, seg * 2048, block(f"before{seg}"))
        await s.agent.flush()

    run(original, make)
    subprocess.run(["cp", "-a", str(original), str(copy)], check=True)

    async def both() -> None:
        one, two = Service(str(original)), Service(str(copy))
        await one.start()
        await two.start()
        try:
            for seg in range(8):
                await one.agent.write(ids["v"], seg * 2048, block(f"one{seg}"))
                await two.agent.write(ids["v"], seg * 2048 + 1, block(f"two{seg}"))
            await one.agent.flush()
            await two.agent.flush()
            for seg in range(8):
                assert bytes(await one.agent.read(ids["v"], seg * 2048, 2)) == block(f"one{seg}") + bytes(512)
                assert bytes(await two.agent.read(ids["v"], seg * 2048, 2)) == block(f"before{seg}") + block(f"two{seg}")
        finally:
            await one.stop()
            await two.stop()

    asyncio.run(both())
    assert check_store(str(original / "san.db"))[0] == [] and check_store(str(copy / "san.db"))[0] == []


def test_a_stale_copy_of_the_store_refuses_storage_another_copy_used(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    original, copy = tmp_path / "data", tmp_path / "copy"

    async def make(s: Service) -> None:
        await s.controller.create_pool("ext", 64 * MIB, path=str(outside / "ext.img"))
        v = await s.controller.create_vdisk("v", "ext", 16 * MIB)
        await s.agent.write(v.id, 0, block("shared"), fua=True)

    run(original, make, allow_paths=(str(outside),))
    shutil.copytree(original, copy, symlinks=True, ignore=shutil.ignore_patterns("lock"))

    async def use_copy(s: Service) -> None:
        assert s.controller.offline == {}
        await s.agent.write(s.controller.vdisk("v").id, 1, block("from the copy"), fua=True)

    run(copy, use_copy)
    image = sha(outside / "ext.img")

    async def stale(s: Service) -> None:
        c = s.controller
        pool = c.pool("ext")
        assert "another copy of this store has used it" in c.offline.get(pool.id, ""), c.offline

    run(original, stale)
    assert sha(outside / "ext.img") == image, "the stale store wrote nothing into it"
    problems, _ = check_store(str(original / "san.db"))
    assert any("another copy of this store" in p for p in problems), problems
    assert check_store(str(copy / "san.db"))[0] == []


def test_a_thick_vdisk_on_a_sparse_pool_file_has_real_space(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", "256m") as small:
        with open(small / "other.img", "wb") as other:  # the file system's other tenants: 180M of its 256M
            other.write(bytes(180 * MIB))

        async def body(s: Service) -> None:
            c = s.controller
            pool = await c.create_pool("sparse", 200 * MIB, path=str(small / "sparse.img"))
            with pytest.raises(NoSpace, match="file system"):
                await c.create_vdisk("big", "sparse", 150 * MIB, thin=False)
            assert c.vdisks == {} and c.usage(pool).used_bytes == 0
            thick = await c.create_vdisk("fits", "sparse", 16 * MIB, thin=False)
            await c.finish_thick(thick)
            assert (small / "sparse.img").stat().st_blocks * 512 >= 16 * MIB
            filler = fill(small)  # the file system is full now; the thick vdisk's blocks are its own
            try:
                for seg in range(16):
                    await s.agent.write(thick.id, seg * 2048, block(f"t{seg}") * 2048, fua=True)
                for seg in range(16):
                    assert bytes(await s.agent.read(thick.id, seg * 2048, 1)) == block(f"t{seg}")
            finally:
                os.unlink(filler)

        run(tmp_path / "data", body, allow_paths=(str(small),))
        assert check_store(str(tmp_path / "data" / "san.db"))[0] == []


def test_only_files_an_interrupted_create_left_are_removed(tmp_path: Path) -> None:
    data = tmp_path / "data"

    async def make(s: Service) -> None:
        await s.controller.create_pool("p", 16 * MIB)

    run(data, make)
    pools = data / "pools"
    shutil.copy(pools / "p.img", pools / "p.img.bak")  # an admin's copy: it names a container the store knows
    label = bytearray((pools / "p.img").read_bytes()[:4096])
    (pools / "orphan.img").write_bytes(bytes(2 * MIB))
    empty = pools / "empty.img"
    empty.touch()
    os.truncate(empty, 2 * MIB)  # created, never labelled nor written

    async def orphaned(s: Service) -> None:
        await s.controller.create_pool("q", 16 * MIB)

    # A label of this store for a container it never recorded: what a create killed before its commit leaves.
    run(data, orphaned)
    q_label = (pools / "q.img").read_bytes()[:4096]
    (pools / "interrupted.img").write_bytes(q_label + bytes(MIB))

    async def interrupted(s: Service) -> None:
        await s.controller.delete_pool("q")  # q's id is no longer in the store; interrupted.img still names it

    run(data, interrupted)
    run(data, lambda s: asyncio.sleep(0))
    left = sorted(os.listdir(pools))
    assert left == ["orphan.img", "p.img", "p.img.bak"], left
    assert (pools / "p.img").read_bytes()[:4096][:8] == bytes(label[:8])


def test_a_label_on_two_devices_is_taken_from_neither(tmp_path: Path, loops: Loops) -> None:
    image = tmp_path / "one.img"
    image.write_bytes(bytes(32 * MIB))
    device = loops.attach(image)
    data = tmp_path / "data"

    async def make(s: Service) -> None:
        await s.controller.create_pool("dev", path=device)

    run(data, make)
    loops.detach(device)
    clone = tmp_path / "clone.img"
    shutil.copy(image, clone)
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(32 * MIB))
    loops.attach(blank, device)  # another disk under the old name: san looks for its label elsewhere
    loops.attach(image)
    loops.attach(clone)

    async def twice(s: Service) -> None:
        pool = s.controller.pool("dev")
        assert "all carry its label" in s.controller.offline.get(pool.id, ""), s.controller.offline

    # The original and its clone are both attached elsewhere: the label is on two devices.
    run(data, twice)


def _version2_store(data: Path, first_pseg: int) -> Path:
    """A data directory as san made it before labels (schema 2): one pool file, one vdisk with one mapped segment
    at physical segment first_pseg, holding 'old data'."""
    from san.store.sqlite import SCHEMA, SCHEMA_V2

    (data / "pools").mkdir(parents=True, mode=0o700)
    image = data / "pools" / "old.img"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
        f.seek(first_pseg * MIB)
        f.write(block("old data"))
    db = sqlite3.connect(data / "san.db", isolation_level=None)
    for statement in SCHEMA + SCHEMA_V2:
        db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.execute("INSERT INTO pool VALUES (1, 'old', ?, 80, 4)", (MIB,))
    db.execute("INSERT INTO container VALUES (1, 1, ?, 'file', ?, 16, 1)", (str(image), 16 * MIB))
    db.execute("INSERT INTO vdisk VALUES (1, 'v', 1, ?, 512, 1, 'abcdef0123456789', 'ready')", (8 * MIB,))
    db.execute("INSERT INTO mapping VALUES (1, 0, 1, ?, 0)", (first_pseg,))
    db.execute("INSERT INTO segment VALUES (1, ?, 1)", (first_pseg,))
    db.close()
    return image


def test_a_store_from_before_labels_is_labelled(tmp_path: Path) -> None:
    data = tmp_path / "data"
    image = _version2_store(data, 3)

    async def upgraded(s: Service) -> None:
        c = s.controller
        assert c.offline == {}
        (container,) = c.pool_containers(c.pool("old"))
        assert container.uuid and container.epoch and container.path == "pools/old.img"
        assert bytes(await s.agent.read(c.vdisk("v").id, 0, 1)) == block("old data")
        assert c.usage(c.pool("old")).capacity_bytes == 15 * MIB, "its first segment holds the label now"

    run(data, upgraded)
    assert image.read_bytes()[:8] == b"SANLABEL"
    assert check_store(str(data / "san.db"))[0] == []


def test_a_store_from_before_labels_whose_first_segment_holds_data_stays_offline(tmp_path: Path) -> None:
    data = tmp_path / "data"
    image = _version2_store(data, 0)
    before = sha(image)

    async def refused(s: Service) -> None:
        c = s.controller
        assert "its first segment holds data" in c.offline.get(c.pool("old").id, ""), c.offline

    run(data, refused)
    assert sha(image) == before, "nothing was written into it"
