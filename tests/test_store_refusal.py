"""`san serve` refuses a store that `san check` rejects, with one clear line, and touches none of its storage; a
container that cannot be used takes only its pool offline.

The damaged stores are the ones that once lost data: a 0-byte or missing san.db beside live pool files, space-map
rows deleted for mapped segments (the reserve refill zeroed them within seconds), a segment mapped by two vdisks."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import SanServer, assert_clean, assert_one_line, free_port, run_san

MIB = 1 << 20
ZONED = "iqn.2024-01.org.example:refusal"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused_to_serve(data: Path) -> str:
    """Run san serve on data: it must exit 1 with one line on stderr (no traceback); that line."""
    result = run_san("serve", "--data", str(data), "--api", f"127.0.0.1:{free_port()}", "--portal", "none", timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return assert_one_line(result.stderr)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stopped data directory with two pools and written thin vdisks."""
    base = tmp_path_factory.mktemp("built")
    server = SanServer(base / "data", base / "cwd").start()
    try:
        server.ok("pool", "create", "p1", "--size", "64M")
        server.ok("pool", "create", "p2", "--size", "64M")
        server.ok("vdisk", "create", "v1", "--pool", "p1", "--size", "32M")
        server.ok("vdisk", "create", "v2", "--pool", "p2", "--size", "32M")
        server.ok("host", "create", "h", "--iqn", ZONED)
        server.ok("zone", "add", "h", "v1")
        server.ok("zone", "add", "h", "v2")
        assert server.stop() == 0
    finally:
        server.kill()
    data = base / "data"
    with sqlite3.connect(data / "san.db") as db:
        # Mappings written straight into the tables the way the controller writes them: 24 segments of v1.
        cid = db.execute("SELECT c.id FROM container c JOIN pool p ON p.id = c.pool_id WHERE p.name = 'p1'").fetchone()[0]
        vid = db.execute("SELECT id FROM vdisk WHERE name = 'v1'").fetchone()[0]
        db.executemany(
            "INSERT INTO mapping (vdisk_id, vseg, container_id, pseg, state) VALUES (?, ?, ?, ?, 0)",
            [(vid, seg, cid, seg + 1) for seg in range(24)],
        )
        db.executemany("INSERT INTO segment VALUES (?, ?, 1)", [(cid, seg + 1) for seg in range(24)])
    pool_file = data / "pools" / "p1.img"
    with open(pool_file, "r+b") as f:
        for seg in range(24):
            f.seek((seg + 1) * MIB)
            f.write(f"live data {seg}".encode().ljust(4096, b"!"))
    assert_clean(data)
    return data


@pytest.fixture
def copy(built: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(built, target, ignore=shutil.ignore_patterns("lock"))
    return target


@pytest.mark.parametrize("how", ["empty", "missing"])
def test_no_store_beside_pool_files_is_refused(copy: Path, how: str) -> None:
    pool_file = copy / "pools" / "p1.img"
    before = sha(pool_file)
    if how == "empty":
        (copy / "san.db").write_bytes(b"")
    else:
        (copy / "san.db").unlink()
    for wal in ("san.db-wal", "san.db-shm"):
        (copy / wal).unlink(missing_ok=True)
    line = refused_to_serve(copy)
    assert ("empty" if how == "empty" else "missing") in line and "pool files" in line and "p1.img" in line
    assert sha(pool_file) == before


def test_a_pool_file_of_another_store_is_never_taken(copy: Path, tmp_path: Path) -> None:
    """Starting afresh beside the old pool file: re-creating the pool by its old name, or over its old path, is
    refused instead of zeroing the live data in it."""
    old = copy / "pools" / "p1.img"
    before = sha(old)
    fresh = tmp_path / "fresh"
    server = SanServer(fresh, tmp_path / "cwd", extra=("--allow-path", str(copy / "pools"))).start()
    try:
        line = assert_one_line(server.run("pool", "create", "p1", "--path", str(old), "--existing").stderr)
        assert "belongs to another san store" in line
        time.sleep(1.5)
        assert server.get("/pools") == []
        assert server.stop() == 0
    finally:
        server.kill()
    assert sha(old) == before


def test_space_map_rows_deleted_for_mapped_segments_is_refused(copy: Path) -> None:
    pool_file = copy / "pools" / "p1.img"
    before = sha(pool_file)
    with sqlite3.connect(copy / "san.db") as db:
        rows = db.execute("SELECT container_id, pseg FROM segment ORDER BY pseg LIMIT 20").fetchall()
        db.executemany("DELETE FROM segment WHERE container_id = ? AND pseg = ?", rows)
    line = refused_to_serve(copy)
    assert "fails san check with 20 problem(s)" in line and "marked free" in line and "san check --data" in line
    time.sleep(1)
    assert sha(pool_file) == before, "nothing was zeroed"


def test_a_segment_mapped_by_two_vdisks_is_refused(copy: Path) -> None:
    with sqlite3.connect(copy / "san.db") as db:
        v2 = db.execute("SELECT id FROM vdisk WHERE name = 'v2'").fetchone()[0]
        cid, pseg = db.execute("SELECT container_id, pseg FROM mapping ORDER BY pseg LIMIT 1").fetchone()
        db.execute("UPDATE vdisk SET pool_id = (SELECT pool_id FROM container WHERE id = ?) WHERE id = ?", (cid, v2))
        db.execute("INSERT INTO mapping (vdisk_id, vseg, container_id, pseg, state) VALUES (?, 0, ?, ?, 0)", (v2, cid, pseg))
        db.execute("UPDATE segment SET refcount = 2 WHERE container_id = ? AND pseg = ?", (cid, pseg))
    assert "shared outside its version set" in refused_to_serve(copy)


def test_a_missing_pool_file_takes_only_its_pool_offline(copy: Path, tmp_path: Path) -> None:
    (copy / "pools" / "p1.img").unlink()
    server = SanServer(copy, tmp_path / "cwd", extra=("--iqn", "iqn.2003-01.org.san:refusal")).start()
    try:
        pools = {p["name"]: p for p in server.get("/pools")}
        assert pools["p1"]["state"] == "offline" and "p1.img" in pools["p1"]["problem"]
        assert pools["p2"]["state"] == "online"
        vdisks = {v["name"]: v["state"] for v in server.get("/vdisks")}
        assert vdisks == {"v1": "offline", "v2": "ready"}
        errors = [line for line in server.log_text().splitlines() if "ERROR" in line]
        assert len(errors) == 1 and "pool p1 is offline" in errors[0], errors
        assert "Traceback" not in server.log_text()
        listed = subprocess.run(["iscsi-ls", "-i", ZONED, "-s", f"iscsi://127.0.0.1:{server.iscsi_port}"],
                                capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert listed.returncode == 0 and listed.stdout.count("Lun:") == 1, listed.stdout
        written = subprocess.run(
            ["qemu-io", "--image-opts", f"driver=iscsi,transport=tcp,portal=127.0.0.1:{server.iscsi_port},"
             f"target=iqn.2003-01.org.san:refusal,lun=1,initiator-name={ZONED}", "-c", "write -P 0x5a 0 64k",
             "-c", "read -P 0x5a 0 64k"], capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert written.returncode == 0 and "Pattern verification failed" not in written.stdout, written.stdout
        assert server.stop() == 0
    finally:
        server.kill()
