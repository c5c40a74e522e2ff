"""`san check --data DIR`: clean on a store the controller made, exit 1 naming the problem on each kind of damage.

The healthy data directory is built once, in process, through the Service (thick vdisks, and thin ones with data
written through the agent); every damage test works on its own copy, changed with sqlite3 directly."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import check_data

from san.model import KIB, MIB
from san.service import DB_NAME, Service


@dataclass
class Report:
    """What `san check` said."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def problems(self) -> list[str]:
        return [line.removeprefix("problem: ") for line in self.stderr.splitlines() if line.startswith("problem: ")]


def check(data: Path) -> Report:
    result: subprocess.CompletedProcess[str] = check_data(data)
    return Report(result.returncode, result.stdout, result.stderr)


def one_problem(data: Path) -> str:
    """Run san check on damaged data: exit 1, exactly one problem, the count line; the problem's text."""
    report = check(data)
    assert report.returncode == 1, report
    assert len(report.problems) == 1, report.problems
    assert "1 problem(s) found" in report.stderr
    assert "clean" not in report.stdout
    return report.problems[0]


async def _build(data: Path) -> None:
    service = Service(str(data), commit_interval=3600)
    await service.start()
    try:
        c = service.controller
        await c.create_pool("alpha", 64 * MIB)
        await c.create_pool("beta", 8 * MIB, segment_size=64 * KIB)
        for name, pool, size in (("thick1", "alpha", 4 * MIB), ("thick2", "alpha", 3 * MIB), ("thick3", "beta", 200 * KIB)):
            vdisk = await c.create_vdisk(name, pool, size, thin=False)
            await c.finish_thick(vdisk)
        thin1 = await c.create_vdisk("thin1", "alpha", 32 * MIB)
        thin2 = await c.create_vdisk("thin2", "beta", 2 * MIB, block_size=4096)
        # Scattered writes, so thin vdisks map a few segments each.
        for lba in (0, 5 * MIB // 512, 20 * MIB // 512):
            await service.agent.write(thin1.id, lba, b"\xa5" * 4096, fua=True)
        await service.agent.write(thin2.id, 64 * KIB // 4096 * 3, b"\x5a" * 4096, fua=True)
        await service.agent.flush()
    finally:
        await service.stop()


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("healthy") / "data"
    asyncio.run(_build(data))
    return data


@contextmanager
def store(data: Path) -> Iterator[sqlite3.Connection]:
    """The store of a data directory, opened with plain sqlite3; changes are committed on leaving."""
    db = sqlite3.connect(data / DB_NAME)
    try:
        yield db
        db.commit()
    finally:
        db.close()


def vdisk_id(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT id FROM vdisk WHERE name = ?", (name,)).fetchone()
    assert row is not None, name
    return int(row[0])


def physical(db: sqlite3.Connection, name: str, vseg: int) -> tuple[int, int]:
    """(container id, physical segment) that vdisk name's segment vseg maps to."""
    row = db.execute(
        "SELECT container_id, pseg FROM mapping WHERE vdisk_id = ? AND vseg = ?", (vdisk_id(db, name), vseg)
    ).fetchone()
    assert row is not None, (name, vseg)
    return int(row[0]), int(row[1])


@pytest.fixture
def damaged(healthy: Path, tmp_path: Path) -> Path:
    """A copy of the healthy data directory: the store keeps pool file paths relative to it, so the copy's store
    points at the copy's pool files, never at the original's."""
    copy = tmp_path / "copy"
    shutil.copytree(healthy, copy, ignore=shutil.ignore_patterns("lock"))
    with store(copy) as db:
        for (path,) in db.execute("SELECT path FROM container").fetchall():
            assert not os.path.isabs(path) and (copy / path).is_file(), path
    return copy


def resolved(data: Path, stored: str) -> str:
    """A container path as the store records it, resolved (relative ones are inside the data directory)."""
    return stored if os.path.isabs(stored) else str(data / stored)


def test_healthy_store_is_clean(healthy: Path) -> None:
    report = check(healthy)
    assert report.returncode == 0, report
    assert report.stderr == ""
    lines = report.stdout.splitlines()
    assert lines[-1] == "clean"
    # alpha: thick1 4 + thick2 3 + thin1 3 segments; beta: thick3 4 (200K in 64K segments) + thin2 1.
    assert "pool alpha: capacity 64 segments = used 10 + free 54" in lines
    assert "pool beta: capacity 128 segments = used 5 + free 123" in lines
    assert "5 vdisks, 0 snapshots, 15 mapped segments" in lines


def test_copy_is_clean_before_damage(damaged: Path) -> None:
    assert check(damaged).returncode == 0


def test_mapping_past_the_container_end(damaged: Path) -> None:
    with store(damaged) as db:
        cid, pseg = physical(db, "thick1", 0)
        nsegments = db.execute("SELECT nsegments FROM container WHERE id = ?", (cid,)).fetchone()[0]
        beyond = nsegments + 7
        # Move the mapping and its reference count together: only the bound is wrong.
        db.execute("UPDATE mapping SET pseg = ? WHERE vdisk_id = ? AND vseg = 0", (beyond, vdisk_id(db, "thick1")))
        db.execute("UPDATE segment SET pseg = ? WHERE container_id = ? AND pseg = ?", (beyond, cid, pseg))
    report = check(damaged)
    assert report.returncode == 1
    mapping_problem, space_map_problem = report.problems
    assert "thick1" in mapping_problem and "outside container" in mapping_problem
    assert f"segment {beyond} of {nsegments}" in mapping_problem
    assert f"segment {beyond} of container {cid} is marked used but lies outside it" in space_map_problem


def test_refcount_disagrees_with_mappings(damaged: Path) -> None:
    with store(damaged) as db:
        cid, pseg = physical(db, "thick1", 1)
        db.execute("UPDATE segment SET refcount = 2 WHERE container_id = ? AND pseg = ?", (cid, pseg))
    problem = one_problem(damaged)
    assert f"container {cid} segment {pseg}" in problem
    assert "reference count 2" in problem and "1 mapping" in problem


def test_mapped_segment_without_segment_row(damaged: Path) -> None:
    with store(damaged) as db:
        cid, pseg = physical(db, "thin1", 0)
        db.execute("DELETE FROM segment WHERE container_id = ? AND pseg = ?", (cid, pseg))
    problem = one_problem(damaged)
    assert f"container {cid} segment {pseg}" in problem and "marked free" in problem


def test_two_vdisks_share_a_segment(damaged: Path) -> None:
    with store(damaged) as db:
        cid, pseg = physical(db, "thick1", 0)
        old = physical(db, "thick2", 0)
        db.execute(
            "UPDATE mapping SET container_id = ?, pseg = ? WHERE vdisk_id = ? AND vseg = 0", (cid, pseg, vdisk_id(db, "thick2"))
        )
        # Reference counts made to agree, so sharing is the one thing wrong.
        db.execute("DELETE FROM segment WHERE container_id = ? AND pseg = ?", old)
        db.execute("UPDATE segment SET refcount = 2 WHERE container_id = ? AND pseg = ?", (cid, pseg))
    problem = one_problem(damaged)
    assert f"container {cid} segment {pseg}" in problem
    assert "shared" in problem and "thick1" in problem and "thick2" in problem


def test_thin_and_thick_vdisks_share_a_segment(damaged: Path) -> None:
    with store(damaged) as db:
        cid, pseg = physical(db, "thick1", 2)
        old = physical(db, "thin1", 0)
        db.execute(
            "UPDATE mapping SET container_id = ?, pseg = ? WHERE vdisk_id = ? AND vseg = 0", (cid, pseg, vdisk_id(db, "thin1"))
        )
        db.execute("DELETE FROM segment WHERE container_id = ? AND pseg = ?", old)
        db.execute("UPDATE segment SET refcount = 2 WHERE container_id = ? AND pseg = ?", (cid, pseg))
    problem = one_problem(damaged)
    assert "shared" in problem and "thick1" in problem and "thin1" in problem


def test_container_file_truncated(damaged: Path) -> None:
    with store(damaged) as db:
        cid, stored, nsegments, segment_size = db.execute(
            "SELECT c.id, c.path, c.nsegments, p.segment_size FROM container c"
            " JOIN pool p ON p.id = c.pool_id WHERE p.name = 'beta'"
        ).fetchone()
    path = resolved(damaged, stored)
    os.truncate(path, 3 * MIB)
    problem = one_problem(damaged)
    assert f"container {cid}" in problem and path in problem
    assert str(3 * MIB) in problem and str(nsegments * segment_size) in problem


def test_thick_vdisk_missing_a_mapping(damaged: Path) -> None:
    with store(damaged) as db:
        cid, pseg = physical(db, "thick1", 3)
        db.execute("DELETE FROM mapping WHERE vdisk_id = ? AND vseg = 3", (vdisk_id(db, "thick1"),))
        db.execute("DELETE FROM segment WHERE container_id = ? AND pseg = ?", (cid, pseg))
    problem = one_problem(damaged)
    assert "thick vdisk thick1" in problem and "3 of its 4 segments" in problem


def test_mapping_beyond_the_vdisk_size(damaged: Path) -> None:
    with store(damaged) as db:
        physical(db, "thin2", 3)  # the segment written in _build
        db.execute("UPDATE mapping SET vseg = 40 WHERE vdisk_id = ? AND vseg = 3", (vdisk_id(db, "thin2"),))
    problem = one_problem(damaged)
    assert "thin2" in problem and "segment 40" in problem and "beyond its size" in problem


def test_several_problems_are_all_reported(damaged: Path) -> None:
    with store(damaged) as db:
        cid, pseg = physical(db, "thick1", 1)
        db.execute("UPDATE segment SET refcount = 5 WHERE container_id = ? AND pseg = ?", (cid, pseg))
        db.execute("DELETE FROM mapping WHERE vdisk_id = ? AND vseg = 0", (vdisk_id(db, "thick3"),))
    report = check(damaged)
    assert report.returncode == 1
    assert len(report.problems) == 3, report.problems  # the refcount, thick3's lost mapping and its orphaned count
    assert "3 problem(s) found" in report.stderr


def test_missing_store(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for data in (empty, tmp_path / "nonexistent"):
        report = check(data)
        assert report.returncode == 1
        assert report.problems == [f"no store at {data / DB_NAME}"]
        assert "clean" not in report.stdout


def test_unreadable_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / DB_NAME).write_bytes(b"this is not an sqlite database" * 100)
    report = check(data)
    assert report.returncode == 1
    assert len(report.problems) == 1 and "cannot be read" in report.problems[0], report


def test_container_path_replaced_by_a_directory(damaged: Path) -> None:
    with store(damaged) as db:
        cid, stored = db.execute("SELECT id, path FROM container ORDER BY id LIMIT 1").fetchone()
    path = resolved(damaged, stored)
    os.unlink(path)
    os.mkdir(path)
    report = check(damaged)
    assert report.returncode == 1
    assert "Traceback" not in report.stderr
    assert any(f"container {cid}" in p for p in report.problems), report
