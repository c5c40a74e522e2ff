"""End to end: a real `san serve` subprocess driven by the real `san` CLI (and by plain HTTP for the API itself).

Most tests share the module's server (fixture `san_server`) and use pool and vdisk names of their own; the
persistence tests start and restart servers of their own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SanServer, assert_clean, assert_one_line, free_port, run_san, running_server

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30


def refused(server: SanServer, *args: str, cwd: str | os.PathLike[str] | None = None) -> str:
    """Run a CLI command that must fail: non-zero exit, exactly one line on stderr, nothing on stdout, nothing
    changed (what `pool list --json` and `vdisk list --json` show, and the pool files, are the same before and after)."""
    before = server.state()
    result = server.run(*args, cwd=cwd)
    assert result.returncode != 0, f"san {' '.join(args)} succeeded: {result.stdout}"
    line = assert_one_line(result.stderr)
    assert line.startswith("san"), line
    assert result.stdout == ""
    assert server.state() == before, f"san {' '.join(args)} failed but changed something"
    return line


def make_file(path: Path, size: int) -> Path:
    """A sparse file of size bytes, as `truncate -s SIZE PATH` makes it."""
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)
    return path


def usage(pool: dict[str, Any]) -> tuple[int, int, int]:
    return pool["capacity_bytes"], pool["used_bytes"], pool["free_bytes"]


# -- status ------------------------------------------------------------------------------------------------


def test_status(san_server: SanServer) -> None:
    out = san_server.ok("status")
    assert "version:" in out and san_server.data in out
    status = san_server.json("status")
    assert status["data_dir"] == os.path.abspath(san_server.data)
    assert status["agents"] == 1
    assert status["pools"] == len(san_server.pools())


def test_status_with_api_option(san_server: SanServer) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SAN_API"}
    for args in (["--api", san_server.api, "status", "--json"], ["status", "--json", "--api", san_server.api]):
        result = run_san(*args, env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["data_dir"] == os.path.abspath(san_server.data)


@pytest.mark.parametrize("how", ["option", "env"])
def test_unreachable_api_is_one_clear_line(how: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SAN_API"}
    if how == "env":
        env["SAN_API"] = "http://127.0.0.1:1"
        result = run_san("status", env=env)
    else:
        result = run_san("--api", "http://127.0.0.1:1", "status", env=env)
    assert result.returncode != 0
    line = assert_one_line(result.stderr)
    assert "cannot reach" in line and "127.0.0.1:1" in line
    assert result.stdout == ""


# -- pools -------------------------------------------------------------------------------------------------


def test_pool_create_default_sparse_file(san_server: SanServer) -> None:
    out = san_server.ok("pool", "create", "dflt", "--size", "64M")
    assert "dflt" in out
    image = Path(san_server.data) / "pools" / "dflt.img"
    assert image.is_file()
    st = image.stat()
    assert st.st_size == 65 * MIB, "the 64M asked for, and one segment more for the label"
    assert st.st_blocks * 512 < 8 * MIB, "the default pool file should be sparse"
    assert st.st_mode & 0o777 == 0o600
    pool = san_server.json("pool", "show", "dflt")
    assert usage(pool) == (64 * MIB, 0, 64 * MIB)
    assert pool["segment_size"] == MIB
    assert pool["provisioned_bytes"] == 0 and pool["vdisks"] == 0
    assert [(c["path"], c["kind"], c["size_bytes"], c["nsegments"], c["owned"]) for c in pool["containers"]] == [
        (str(image), "file", 65 * MIB, 65, True)
    ]
    assert image.read_bytes()[:8] == b"SANLABEL"
    assert san_server.pools()["dflt"] == pool


def test_pool_create_on_existing_file(san_server: SanServer, tmp_path: Path) -> None:
    path = make_file(tmp_path / "existing.img", 48 * MIB + 100 * KIB)
    assert "--existing" in refused(san_server, "pool", "create", "onfile", "--path", str(path))
    san_server.ok("pool", "create", "onfile", "--path", str(path), "--existing")
    pool = san_server.json("pool", "show", "onfile")
    assert usage(pool) == (47 * MIB, 0, 47 * MIB), "capacity is the whole segments the file holds, but the label's"
    assert pool["segment_size"] == MIB
    (container,) = pool["containers"]
    assert (container["path"], container["size_bytes"], container["nsegments"], container["owned"]) == (
        str(path),
        48 * MIB + 100 * KIB,
        48,
        False,
    )

    # Only part of a file, when --size says so.
    part = make_file(tmp_path / "part.img", 64 * MIB)
    san_server.ok("pool", "create", "onpart", "--path", str(part), "--size", "16M", "--existing")
    assert usage(san_server.json("pool", "show", "onpart")) == (15 * MIB, 0, 15 * MIB)

    # The same file cannot serve two pools; a file smaller than --size is refused.
    assert "already" in refused(san_server, "pool", "create", "onfile2", "--path", str(path), "--existing")
    small = make_file(tmp_path / "small.img", 4 * MIB)
    refused(san_server, "pool", "create", "onsmall", "--path", str(small), "--size", "8M", "--existing")

    # Deleting the pool leaves a file san did not create.
    san_server.ok("pool", "delete", "onfile")
    san_server.ok("pool", "delete", "onpart")
    assert not {"onfile", "onpart"} & set(san_server.pools())
    assert path.stat().st_size == 48 * MIB + 100 * KIB
    assert part.stat().st_size == 64 * MIB


def test_pool_delete_removes_the_file_it_created(san_server: SanServer) -> None:
    san_server.ok("pool", "create", "doomed", "--size", "8M")
    image = Path(san_server.data) / "pools" / "doomed.img"
    assert image.exists()
    assert "doomed" in san_server.ok("pool", "delete", "doomed")
    assert not image.exists()
    assert "doomed" not in san_server.pools()


@pytest.mark.parametrize(
    ("segment", "size", "segment_bytes", "capacity"),
    [("64K", "8M", 64 * KIB, 8 * MIB), ("1G", "3G", GIB, 3 * GIB), ("256K", "1000K", 256 * KIB, 768 * KIB)],
)
def test_segment_size_accepted(san_server: SanServer, segment: str, size: str, segment_bytes: int, capacity: int) -> None:
    name = f"seg{segment.lower()}"
    san_server.ok("pool", "create", name, "--size", size, "--segment-size", segment)
    pool = san_server.json("pool", "show", name)
    assert pool["segment_size"] == segment_bytes
    assert usage(pool) == (capacity, 0, capacity)
    assert pool["containers"][0]["nsegments"] == capacity // segment_bytes + 1, "and one for the label"


@pytest.mark.parametrize("segment", ["3M", "32K", "2G", "100000", "0"])
def test_segment_size_refused(san_server: SanServer, segment: str) -> None:
    line = refused(san_server, "pool", "create", "badseg", "--size", "4G", "--segment-size", segment)
    assert "segment size" in line


def test_pools_with_different_segment_sizes_coexist(san_server: SanServer) -> None:
    layout = {"mix64k": ("64K", 64 * KIB), "mix256k": ("256K", 256 * KIB), "mix4m": ("4M", 4 * MIB)}
    for name, (segment, _) in layout.items():
        san_server.ok("pool", "create", name, "--size", "16M", "--segment-size", segment)
        san_server.ok("vdisk", "create", f"{name}-disk", "--pool", name, "--size", "300K", "--thick")
    pools = san_server.pools()
    vdisks = san_server.vdisks()
    for name, (_, segment_bytes) in layout.items():
        allocated = -(-300 * KIB // segment_bytes) * segment_bytes
        assert pools[name]["segment_size"] == segment_bytes
        assert usage(pools[name]) == (16 * MIB, allocated, 16 * MIB - allocated)
        assert vdisks[f"{name}-disk"]["allocated_bytes"] == allocated
        assert vdisks[f"{name}-disk"]["pool"] == name
    listed = [p["name"] for p in san_server.json("pool", "list")]
    assert listed == sorted(listed)
    assert {"mix64k", "mix256k", "mix4m"} <= set(listed)


# -- vdisks ------------------------------------------------------------------------------------------------


def test_thin_vdisk(san_server: SanServer) -> None:
    san_server.ok("pool", "create", "thinpool", "--size", "32M")
    out = san_server.ok("vdisk", "create", "thin1", "--pool", "thinpool", "--size", "8M")
    assert "thin1" in out and "thin" in out
    vdisk = san_server.json("vdisk", "show", "thin1")
    assert (vdisk["size_bytes"], vdisk["allocated_bytes"], vdisk["thin"]) == (8 * MIB, 0, True)
    assert (vdisk["pool"], vdisk["block_size"], vdisk["state"]) == ("thinpool", 512, "ready")
    assert san_server.vdisks()["thin1"] == vdisk
    pool = san_server.json("pool", "show", "thinpool")
    assert usage(pool) == (32 * MIB, 0, 32 * MIB)
    assert (pool["provisioned_bytes"], pool["vdisks"]) == (8 * MIB, 1)


def test_thick_vdisk_rounds_up_to_segments(san_server: SanServer) -> None:
    san_server.ok("pool", "create", "thickpool", "--size", "8M", "--segment-size", "64K")
    out = san_server.ok("vdisk", "create", "thick1", "--pool", "thickpool", "--size", "100K", "--thick")
    assert "thick1" in out and "thick" in out
    vdisk = san_server.json("vdisk", "show", "thick1")
    assert (vdisk["size_bytes"], vdisk["allocated_bytes"], vdisk["thin"], vdisk["state"]) == (
        100 * KIB,
        128 * KIB,
        False,
        "ready",
    )
    pool = san_server.json("pool", "show", "thickpool")
    assert usage(pool) == (8 * MIB, 128 * KIB, 8 * MIB - 128 * KIB)
    assert pool["provisioned_bytes"] == 100 * KIB


def test_block_size_4096(san_server: SanServer) -> None:
    san_server.ok("pool", "create", "bspool", "--size", "16M")
    san_server.ok("vdisk", "create", "bs4k", "--pool", "bspool", "--size", "8M", "--block-size", "4096")
    san_server.ok("vdisk", "create", "bs4k-thick", "--pool", "bspool", "--size", "12K", "--block-size", "4096", "--thick")
    vdisks = san_server.vdisks()
    assert (vdisks["bs4k"]["block_size"], vdisks["bs4k"]["size_bytes"], vdisks["bs4k"]["thin"]) == (4096, 8 * MIB, True)
    assert (vdisks["bs4k-thick"]["block_size"], vdisks["bs4k-thick"]["allocated_bytes"]) == (4096, MIB)
    assert san_server.json("vdisk", "show", "bs4k") == vdisks["bs4k"]


def test_grow_thin(san_server: SanServer) -> None:
    san_server.ok("pool", "create", "growthin", "--size", "16M")
    san_server.ok("vdisk", "create", "gthin", "--pool", "growthin", "--size", "8M")
    assert "gthin" in san_server.ok("vdisk", "grow", "gthin", "--size", "1G")
    vdisk = san_server.json("vdisk", "show", "gthin")
    assert (vdisk["size_bytes"], vdisk["allocated_bytes"], vdisk["thin"]) == (GIB, 0, True)
    pool = san_server.json("pool", "show", "growthin")
    assert usage(pool) == (16 * MIB, 0, 16 * MIB)
    assert pool["provisioned_bytes"] == GIB


def test_grow_thick(san_server: SanServer) -> None:
    san_server.ok("pool", "create", "growthick", "--size", "32M")
    san_server.ok("vdisk", "create", "gthick", "--pool", "growthick", "--size", "4M", "--thick")
    assert san_server.get("/pools/growthick")["used_bytes"] == 4 * MIB
    san_server.ok("vdisk", "grow", "gthick", "--size", "6.5M")
    vdisk = san_server.get("/vdisks/gthick")
    assert (vdisk["size_bytes"], vdisk["allocated_bytes"], vdisk["thin"]) == (6 * MIB + 512 * KIB, 7 * MIB, False)
    assert usage(san_server.get("/pools/growthick")) == (32 * MIB, 7 * MIB, 25 * MIB)
    # Growing within the last, already allocated segment takes nothing more.
    san_server.ok("vdisk", "grow", "gthick", "--size", "7M")
    assert san_server.get("/vdisks/gthick")["allocated_bytes"] == 7 * MIB
    assert san_server.get("/pools/growthick")["used_bytes"] == 7 * MIB


def test_delete_returns_segments_to_the_pool(san_server: SanServer) -> None:
    san_server.ok("pool", "create", "delpool", "--size", "32M")
    san_server.ok("vdisk", "create", "del-a", "--pool", "delpool", "--size", "5M", "--thick")
    san_server.ok("vdisk", "create", "del-b", "--pool", "delpool", "--size", "3M", "--thick")
    san_server.ok("vdisk", "create", "del-c", "--pool", "delpool", "--size", "1G")
    assert usage(san_server.get("/pools/delpool")) == (32 * MIB, 8 * MIB, 24 * MIB)
    assert "del-a" in san_server.ok("vdisk", "delete", "del-a")
    assert "del-a" not in san_server.vdisks()
    assert usage(san_server.get("/pools/delpool")) == (32 * MIB, 3 * MIB, 29 * MIB)
    san_server.ok("vdisk", "delete", "del-b")
    san_server.ok("vdisk", "delete", "del-c")
    pool = san_server.get("/pools/delpool")
    assert usage(pool) == (32 * MIB, 0, 32 * MIB)
    assert (pool["provisioned_bytes"], pool["vdisks"]) == (0, 0)
    # The freed segments can be allocated again, and the now empty pool deleted.
    san_server.ok("vdisk", "create", "del-d", "--pool", "delpool", "--size", "32M", "--thick")
    assert san_server.get("/pools/delpool")["free_bytes"] == 0
    san_server.ok("vdisk", "delete", "del-d")
    san_server.ok("pool", "delete", "delpool")
    assert "delpool" not in san_server.pools()


def test_thin_overcommit(san_server: SanServer) -> None:
    san_server.ok("pool", "create", "overpool", "--size", "16M")
    for name, size in (("over1", "10M"), ("over2", "10M"), ("over3", "1G")):
        san_server.ok("vdisk", "create", name, "--pool", "overpool", "--size", size)
    pool = san_server.json("pool", "show", "overpool")
    assert pool["provisioned_bytes"] == 20 * MIB + GIB > pool["capacity_bytes"]
    assert usage(pool) == (16 * MIB, 0, 16 * MIB)
    assert pool["vdisks"] == 3


def test_thick_vdisk_can_take_the_whole_pool(san_server: SanServer) -> None:
    san_server.ok("pool", "create", "fullpool", "--size", "8M")
    # Let the service's timer build its reserve of zeroed segments: they still count as free space.
    san_server.ok("vdisk", "create", "full-thin", "--pool", "fullpool", "--size", "64M")
    time.sleep(1.2)
    san_server.ok("vdisk", "create", "full-thick", "--pool", "fullpool", "--size", "8M", "--thick")
    assert usage(san_server.get("/pools/fullpool")) == (8 * MIB, 8 * MIB, 0)
    refused(san_server, "vdisk", "create", "full-more", "--pool", "fullpool", "--size", "512", "--thick")
    san_server.ok("vdisk", "delete", "full-thick")
    assert usage(san_server.get("/pools/fullpool")) == (8 * MIB, 0, 8 * MIB)


# -- human output ------------------------------------------------------------------------------------------


def test_human_tables(san_server: SanServer) -> None:
    san_server.ok("pool", "create", "tblpool", "--size", "16M")
    san_server.ok("vdisk", "create", "tbl-thin", "--pool", "tblpool", "--size", "1G")
    san_server.ok("vdisk", "create", "tbl-thick", "--pool", "tblpool", "--size", "2M", "--thick", "--block-size", "4096")

    lines = san_server.ok("pool", "list").splitlines()
    headers = ["NAME", "SEGMENT", "CAPACITY", "USED", "FREE", "DATA%", "PROVISIONED", "VDISKS", "STATE", "PATH"]
    assert lines[0].split() == headers
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert all(len(row) == 10 for row in rows.values()), lines
    assert set(rows) == {p["name"] for p in san_server.get("/pools")}
    path = f"{san_server.data}/pools/tblpool.img"
    assert rows["tblpool"] == ["tblpool", "1.00M", "16.00M", "2.00M", "14.00M", "12.50", "1.00G", "2", "online", path]

    lines = san_server.ok("vdisk", "list").splitlines()
    assert lines[0].split() == ["NAME", "POOL", "SIZE", "ALLOCATED", "DATA%", "TYPE", "BLOCK", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert all(len(row) == 8 for row in rows.values()), lines
    assert set(rows) == {v["name"] for v in san_server.get("/vdisks")}
    assert rows["tbl-thin"] == ["tbl-thin", "tblpool", "1.00G", "0B", "0.00", "thin", "512", "ready"]
    assert rows["tbl-thick"] == ["tbl-thick", "tblpool", "2.00M", "2.00M", "100.00", "thick", "4096", "ready"]

    # As lvs takes them: chosen columns, added ones, units, no headings, a separator.
    picked = san_server.ok("vdisk", "list", "-o", "name,size,data", "--units", "b", "--noheadings").splitlines()
    assert ["tbl-thick", "2097152B", "100.00"] in [line.split() for line in picked]
    assert all(not line.split()[0].isupper() for line in picked)
    added = san_server.ok("vdisk", "list", "-o", "+serial", "--units", "m").splitlines()
    assert added[0].split()[-1] == "SERIAL" and any("1024.00m" in line for line in added)
    scripted = san_server.ok("pool", "list", "-o", "name,capacity", "--units", "k", "--separator", ";", "--noheadings")
    assert "tblpool;16384.00k" in scripted.splitlines()
    bad = san_server.run("vdisk", "list", "-o", "name,colour")
    assert bad.returncode == 1 and "unknown column 'colour'" in assert_one_line(bad.stderr)
    # Columns line up: every row is as wide as its header allows.
    header = lines[0]
    assert all(line.startswith(row[0].ljust(header.index("POOL"))) for line, row in zip(lines[1:], rows.values(), strict=True))

    shown = san_server.ok("pool", "show", "tblpool")
    assert "capacity:" in shown and "16777216 bytes" in shown and "tblpool.img" in shown
    shown = san_server.ok("vdisk", "show", "tbl-thick")
    assert "provisioning:" in shown and "thick" in shown and "2097152 bytes" in shown
    with pytest.raises(ValueError):
        json.loads(shown)


# -- errors ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def errpool(san_server: SanServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pool `errpool` (10M in 1M segments) with thin `errthin` (4M, 4K blocks) and thick `errthick` (2M)."""
    san_server.ok("pool", "create", "errpool", "--size", "10M")
    san_server.ok("vdisk", "create", "errthin", "--pool", "errpool", "--size", "4M", "--block-size", "4096")
    san_server.ok("vdisk", "create", "errthick", "--pool", "errpool", "--size", "2M", "--thick")
    files = tmp_path_factory.mktemp("errfiles")
    make_file(files / "small.img", 4 * MIB)
    return files


# id: (arguments, words the error line must contain)
ERRORS: dict[str, tuple[list[str], list[str]]] = {
    "duplicate-pool": (["pool", "create", "errpool", "--size", "10M"], ["errpool", "already exists"]),
    "duplicate-vdisk": (["vdisk", "create", "errthin", "--pool", "errpool", "--size", "1M"], ["errthin", "already exists"]),
    "duplicate-vdisk-thick": (["vdisk", "create", "errthick", "--pool", "errpool", "--size", "1M", "--thick"], ["already"]),
    "unknown-pool": (["vdisk", "create", "nopool-disk", "--pool", "nosuchpool", "--size", "1M"], ["nosuchpool"]),
    "unknown-pool-show": (["pool", "show", "nosuchpool"], ["nosuchpool"]),
    "unknown-pool-delete": (["pool", "delete", "nosuchpool"], ["nosuchpool"]),
    "unknown-vdisk-show": (["vdisk", "show", "nosuchdisk"], ["nosuchdisk"]),
    "unknown-vdisk-delete": (["vdisk", "delete", "nosuchdisk"], ["nosuchdisk"]),
    "unknown-vdisk-grow": (["vdisk", "grow", "nosuchdisk", "--size", "1G"], ["nosuchdisk"]),
    "pool-has-vdisks": (["pool", "delete", "errpool"], ["errpool", "errthick", "errthin"]),
    "thick-larger-than-free": (["vdisk", "create", "toobig", "--pool", "errpool", "--size", "9M", "--thick"], ["free"]),
    "thick-one-block-over": (["vdisk", "create", "toobig", "--pool", "errpool", "--size", "8389120", "--thick"], ["free"]),
    "thick-grow-larger-than-free": (["vdisk", "grow", "errthick", "--size", "11M"], ["free"]),
    "size-12Q-vdisk": (["vdisk", "create", "qdisk", "--pool", "errpool", "--size", "12Q"], ["12Q"]),
    "size-12Q-pool": (["pool", "create", "qpool", "--size", "12Q"], ["12Q"]),
    "size-12Q-grow": (["vdisk", "grow", "errthin", "--size", "12Q"], ["12Q"]),
    "size-fraction-of-byte": (["vdisk", "create", "fdisk", "--pool", "errpool", "--size", "0.1K"], ["0.1K"]),
    "size-negative": (["vdisk", "create", "negdisk", "--pool", "errpool", "--size=-1M"], ["-1M"]),
    "size-zero": (["vdisk", "create", "zerodisk", "--pool", "errpool", "--size", "0"], ["size"]),
    "size-not-block-multiple": (["vdisk", "create", "odd", "--pool", "errpool", "--size", "1000"], ["1000", "block size"]),
    "size-not-4k-multiple": (
        ["vdisk", "create", "odd4k", "--pool", "errpool", "--size", "6K", "--block-size", "4096"],
        ["4096", "block size"],
    ),
    "grow-not-block-multiple": (["vdisk", "grow", "errthin", "--size", str(4 * MIB + 512)], ["block size"]),
    "block-size-1000": (["vdisk", "create", "bs1000", "--pool", "errpool", "--size", "1M", "--block-size", "1000"], ["1000"]),
    "grow-smaller": (["vdisk", "grow", "errthin", "--size", "1M"], ["larger"]),
    "grow-same": (["vdisk", "grow", "errthin", "--size", "4M"], ["larger"]),
    "grow-thick-smaller": (["vdisk", "grow", "errthick", "--size", "1M"], ["larger"]),
    "pool-name-slash": (["pool", "create", "a/b", "--size", "10M"], ["a/b"]),
    "vdisk-name-slash": (["vdisk", "create", "a/b", "--pool", "errpool", "--size", "1M"], ["a/b"]),
    "pool-name-space": (["pool", "create", "a b", "--size", "10M"], ["'a b'"]),
    "pool-name-empty": (["pool", "create", "", "--size", "10M"], ["name"]),
    "vdisk-name-dot": (["vdisk", "create", ".hidden", "--pool", "errpool", "--size", "1M"], [".hidden"]),
    "vdisk-name-too-long": (["vdisk", "create", "x" * 64, "--pool", "errpool", "--size", "1M"], ["x" * 64]),
    "pool-new-file-without-size": (["pool", "create", "nosize"], ["--size"]),
    "pool-smaller-than-a-segment": (["pool", "create", "tiny", "--size", "512K"], ["segment"]),
    "pool-path-missing-directory": (
        ["pool", "create", "nodir", "--path", "/nonexistent-san-dir/x.img", "--size", "10M"],
        ["/nonexistent-san-dir"],
    ),
    "pool-warn-percent": (["pool", "create", "warn", "--size", "10M", "--warn-percent", "0"], ["0%"]),
}


@pytest.mark.parametrize(("args", "words"), list(ERRORS.values()), ids=list(ERRORS))
def test_error_is_one_line_and_changes_nothing(san_server: SanServer, errpool: Path, args: list[str], words: list[str]) -> None:
    line = refused(san_server, *args)
    for word in words:
        assert word in line


def test_file_smaller_than_size_and_non_file_path_refused(san_server: SanServer, errpool: Path) -> None:
    refused(san_server, "pool", "create", "smallfile", "--path", str(errpool / "small.img"), "--size", "8M")
    refused(san_server, "pool", "create", "dirpath", "--path", str(errpool), "--size", "8M")


@pytest.mark.parametrize(
    "args",
    [
        ["vdisk", "delete", "errthin-victim?force=1"],
        ["pool", "show", "errpool?x"],
        ["pool", "show", "errpool#x"],
        ["pool", "show", "a b"],
    ],
    ids=["delete-query", "show-query", "show-fragment", "show-space"],
)
def test_names_are_not_url_syntax(san_server: SanServer, errpool: Path, args: list[str]) -> None:
    if args[0] == "vdisk":
        san_server.ok("vdisk", "create", "errthin-victim", "--pool", "errpool", "--size", "1M")
    refused(san_server, *args)


def test_relative_pool_path_is_the_callers(san_server: SanServer, tmp_path: Path) -> None:
    here = tmp_path / "client"
    here.mkdir()
    make_file(here / "rel.img", 8 * MIB)
    result = san_server.run("pool", "create", "relpool", "--path", "rel.img", "--size", "8M", cwd=here)
    stray = san_server.cwd / "rel.img"
    created_elsewhere = stray.exists()
    if result.returncode == 0:
        paths = [c["path"] for c in san_server.get("/pools/relpool")["containers"]]
        san_server.ok("pool", "delete", "relpool")
        stray.unlink(missing_ok=True)
        assert paths == [str(here / "rel.img")]
    else:
        assert_one_line(result.stderr)
    assert not created_elsewhere, f"san serve created {stray}"


# -- the HTTP API itself -----------------------------------------------------------------------------------


def test_openapi(san_server: SanServer) -> None:
    status, spec = san_server.http("GET", "/openapi.json")
    assert status == 200
    assert isinstance(spec, dict) and spec["openapi"].startswith("3.")
    assert {"/status", "/pools", "/pools/{name}", "/vdisks", "/vdisks/{name}", "/vdisks/{name}/grow"} <= set(spec["paths"])
    assert {"get", "post"} <= set(spec["paths"]["/pools"]) and {"get", "post"} <= set(spec["paths"]["/vdisks"])


def test_cli_json_is_the_api_json(san_server: SanServer) -> None:
    assert san_server.http("GET", "/pools") == (200, san_server.json("pool", "list"))
    assert san_server.http("GET", "/vdisks") == (200, san_server.json("vdisk", "list"))


def test_http_create_and_delete(san_server: SanServer) -> None:
    status, pool = san_server.http("POST", "/pools", {"name": "httppool", "size": 4 * MIB, "segment_size": "64K"})
    assert status == 201 and usage(pool) == (4 * MIB, 0, 4 * MIB) and pool["segment_size"] == 64 * KIB
    status, vdisk = san_server.http("POST", "/vdisks", {"name": "httpdisk", "pool": "httppool", "size": "1M", "block_size": 4096})
    assert status == 201 and (vdisk["thin"], vdisk["block_size"], vdisk["allocated_bytes"]) == (True, 4096, 0)
    status, vdisk = san_server.http("POST", "/vdisks/httpdisk/grow", {"size": 2 * MIB})
    assert status == 200 and vdisk["size_bytes"] == 2 * MIB
    assert san_server.http("DELETE", "/vdisks/httpdisk") == (204, None)
    assert san_server.http("DELETE", "/pools/httppool") == (204, None)
    assert san_server.http("GET", "/pools/httppool")[0] == 404


VALID_VDISK = {"name": "hdisk", "pool": "errpool", "size": "1M"}
BAD_BODIES: dict[str, tuple[str, Any]] = {
    "pool-empty": ("/pools", {}),
    "pool-missing-name": ("/pools", {"size": "10M"}),
    "pool-name-number": ("/pools", {"name": 5, "size": "10M"}),
    "pool-size-list": ("/pools", {"name": "hpool", "size": [1]}),
    "pool-size-12Q": ("/pools", {"name": "hpool", "size": "12Q"}),
    "pool-unknown-field": ("/pools", {"name": "hpool", "size": "10M", "colour": "red"}),
    "pool-segment-3M": ("/pools", {"name": "hpool", "size": "10M", "segment_size": "3M"}),
    "pool-warn-text": ("/pools", {"name": "hpool", "size": "10M", "warn_percent": "lots"}),
    "pool-bad-name": ("/pools", {"name": "a/b", "size": "10M"}),
    "pool-not-json": ("/pools", b"{not json"),
    "pool-array": ("/pools", [1, 2]),
    "vdisk-missing-size": ("/vdisks", {"name": "hdisk", "pool": "errpool"}),
    "vdisk-missing-pool": ("/vdisks", {"name": "hdisk", "size": "1M"}),
    "vdisk-block-size-1000": ("/vdisks", {**VALID_VDISK, "block_size": 1000}),
    "vdisk-block-size-text": ("/vdisks", {**VALID_VDISK, "block_size": "big"}),
    "vdisk-thick-list": ("/vdisks", {**VALID_VDISK, "thick": [1]}),
    "vdisk-size-float": ("/vdisks", {**VALID_VDISK, "size": 1.5}),
    "vdisk-size-negative": ("/vdisks", {**VALID_VDISK, "size": -512}),
    "vdisk-size-null": ("/vdisks", {**VALID_VDISK, "size": None}),
    "vdisk-size-odd": ("/vdisks", {**VALID_VDISK, "size": 1000}),
    "vdisk-unknown-field": ("/vdisks", {**VALID_VDISK, "mirror": True}),
    "vdisk-name-object": ("/vdisks", {**VALID_VDISK, "name": {"a": 1}}),
    "grow-empty": ("/vdisks/errthin/grow", {}),
    "grow-text": ("/vdisks/errthin/grow", {"size": "bigger"}),
    "grow-unknown-field": ("/vdisks/errthin/grow", {"size": "8M", "now": True}),
    "grow-smaller": ("/vdisks/errthin/grow", {"size": "1M"}),
}


@pytest.mark.parametrize(("path", "body"), list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_bad_body_is_400_and_changes_nothing(san_server: SanServer, errpool: Path, path: str, body: Any) -> None:
    before = san_server.state()
    if isinstance(body, bytes):
        status, answer = san_server.http("POST", path, raw=body)
    else:
        status, answer = san_server.http("POST", path, body)
    assert status == 400, answer
    assert isinstance(answer, dict) and set(answer) == {"error"}
    assert isinstance(answer["error"], str) and answer["error"].strip() and "\n" not in answer["error"]
    assert san_server.state() == before


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/pools/nosuchpool", None),
        ("DELETE", "/pools/nosuchpool", None),
        ("GET", "/vdisks/nosuchdisk", None),
        ("DELETE", "/vdisks/nosuchdisk", None),
        ("POST", "/vdisks/nosuchdisk/grow", {"size": "1G"}),
    ],
)
def test_unknown_resource_is_404(san_server: SanServer, method: str, path: str, body: Any) -> None:
    before = san_server.state()
    status, answer = san_server.http(method, path, body)
    assert status == 404
    assert isinstance(answer, dict) and "nosuch" in answer["error"]
    assert san_server.state() == before


def test_unknown_route_is_404(san_server: SanServer) -> None:
    assert san_server.http("GET", "/nosuchthing")[0] == 404
    assert san_server.http("GET", "/pools/a/b")[0] == 404


# -- lifecycle: stop, restart, one server per data directory -----------------------------------------------


def build_everything(server: SanServer, files: Path) -> None:
    existing = make_file(files / "persist-file.img", 16 * MIB)
    server.ok("pool", "create", "p-default", "--size", "64M")
    server.ok("pool", "create", "p-64k", "--size", "8M", "--segment-size", "64K")
    server.ok("pool", "create", "p-file", "--path", str(existing), "--existing", "--segment-size", "4M", "--warn-percent", "90")
    server.ok("vdisk", "create", "v-thin", "--pool", "p-default", "--size", "1G")
    server.ok("vdisk", "create", "v-thick", "--pool", "p-default", "--size", "3M", "--thick")
    server.ok("vdisk", "create", "v-4k", "--pool", "p-default", "--size", "8M", "--block-size", "4096")
    server.ok("vdisk", "create", "v-grown", "--pool", "p-default", "--size", "1M", "--thick")
    server.ok("vdisk", "grow", "v-grown", "--size", "2.5M")
    server.ok("vdisk", "create", "v-gone", "--pool", "p-default", "--size", "2M", "--thick")
    server.ok("vdisk", "delete", "v-gone")
    server.ok("vdisk", "create", "v-64k", "--pool", "p-64k", "--size", "100K", "--thick")
    server.ok("vdisk", "create", "v-file", "--pool", "p-file", "--size", "5M", "--thick")


def test_state_survives_restart(tmp_path: Path) -> None:
    data, cwd = tmp_path / "data", tmp_path / "cwd"
    with running_server(data, cwd, "--allow-path", str(tmp_path)) as server:
        build_everything(server, tmp_path)
        pools, vdisks = server.json("pool", "list"), server.json("vdisk", "list")
        assert server.stop() == 0, server.log_text()
    assert_clean(data)
    assert [p["name"] for p in pools] == ["p-64k", "p-default", "p-file"]
    assert {p["name"]: p["used_bytes"] for p in pools} == {"p-64k": 128 * KIB, "p-default": 6 * MIB, "p-file": 8 * MIB}

    with running_server(data, cwd) as server:
        assert server.json("pool", "list") == pools
        assert server.json("vdisk", "list") == vdisks
        # The free-space maps came back too: deleting frees exactly what the vdisk held, and new thick vdisks
        # get segments no other vdisk maps (san check would see sharing).
        server.ok("vdisk", "delete", "v-thick")
        assert server.get("/pools/p-default")["used_bytes"] == 3 * MIB
        server.ok("vdisk", "create", "v-new", "--pool", "p-default", "--size", "61M", "--thick")
        assert usage(server.get("/pools/p-default")) == (64 * MIB, 64 * MIB, 0)
        server.ok("vdisk", "create", "v-new64", "--pool", "p-64k", "--size", "7M", "--thick")
        assert server.stop() == 0, server.log_text()
    assert_clean(data)


def test_second_serve_on_the_same_data_fails(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", tmp_path / "cwd") as server:
        server.ok("pool", "create", "lockpool", "--size", "8M")
        try:
            result = run_san("serve", "--data", server.data, "--api", f"127.0.0.1:{free_port()}", timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("a second san serve on a data directory in use kept running")
        assert result.returncode != 0
        line = assert_one_line(result.stderr)
        assert "in use" in line and server.data in line
        # The first one is unharmed.
        assert "lockpool" in server.pools()
        assert server.stop() == 0, server.log_text()
    assert_clean(tmp_path / "data")


def _serve_on_busy_port(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        try:
            return run_san("serve", "--data", str(tmp_path / "data"), "--api", f"127.0.0.1:{port}", timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("san serve on a port in use kept running")


def test_serve_on_a_busy_port_fails_before_making_anything(tmp_path: Path) -> None:
    result = _serve_on_busy_port(tmp_path)
    assert result.returncode == 1
    line = assert_one_line(result.stderr).lower()
    assert "cannot listen for the management api on 127.0.0.1:" in line and "address already in use" in line
    assert not (tmp_path / "data").exists(), "nothing is made for a service that cannot serve"
