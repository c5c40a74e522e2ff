"""The small ones: huge size strings, control characters in iSCSI names, a full metadata file system, a deleted
vdisk's LUN, a full pool and a full backing file system: each gets a clear answer, and the full ones are logged
once per episode.

Each case is the sequence that once misbehaved: a 500 with a traceback, raw escape sequences printed, MEDIUM ERROR
(unrecovered read error) for a write, LBA OUT OF RANGE for a LUN that is gone, nothing in the log."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SanServer, assert_one_line, serving
from rawiscsi import RawInitiator
from storage_faults import fill, metadata_full, small_filesystem

from san.cli.output import plain

MIB = 1 << 20
TARGET = "iqn.2003-01.org.san:small"
HOST = "iqn.2024-01.org.example:small"


def write16(lba: int, count: int, fua: bool = False) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, lba, count, 0, 0)


def sense_of(response: object) -> tuple[int, int, int]:
    sense = getattr(response, "sense", b"")
    assert len(sense) >= 14, f"no sense data: {response!r}"
    return sense[2] & 0x0F, sense[12], sense[13]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanServer]:
    with serving(tmp_path_factory.mktemp("small"), "--iqn", TARGET) as san:
        san.ok("pool", "create", "p", "--size", "64M")
        san.ok("vdisk", "create", "v", "--pool", "p", "--size", "16M")
        yield san


def test_huge_sizes_are_a_clear_400(server: SanServer) -> None:
    digits = "1" * 5000
    for method, path, body in (
        ("POST", "/pools", {"name": "big", "size": digits + "G"}),
        ("POST", "/vdisks", {"name": "big", "pool": "p", "size": digits}),
        ("POST", "/vdisks/v/grow", {"size": digits + "T"}),
    ):
        status, answer = server.http(method, path, body)
        assert status == 400 and len(answer["error"]) < 300, (path, status, answer)
    raw = b'{"name": "big", "pool": "p", "size": ' + digits.encode() + b"}"
    status, answer = server.http("POST", "/vdisks", raw=raw)
    assert status == 400, (status, answer)
    result = server.run("vdisk", "create", "big", "--pool", "p", "--size", digits)
    assert result.returncode == 2 and len(assert_one_line(result.stderr)) < 300
    assert "Traceback" not in result.stderr and "Traceback" not in server.log_text()


def test_control_characters_never_reach_a_terminal(server: SanServer) -> None:
    for iqn in ("iqn.2024-01.org.example:nul\0here", "iqn.2024-01.org.example:\x1b[31mred", "iqn.2024-01.org.example:a b"):
        status, answer = server.http("POST", "/hosts", {"name": "ctl", "iqn": iqn})
        assert status == 400 and "not an iSCSI name" in answer["error"] and "\x1b" not in answer["error"]
    initiator = RawInitiator(server.iscsi_port, "iqn.2024-01.org.example:\x1b]0;owned\x07")
    try:
        initiator.login(TARGET)
    except ConnectionError:
        pass
    finally:
        initiator.close()
    time.sleep(0.2)
    assert "\x1b" not in server.log_text() and "\\x1b" in server.log_text()
    assert plain("host\x1b[2J\0name") == "host\\x1b[2J\\x00name"


def test_a_deleted_vdisks_lun_is_not_supported(tmp_path: Path) -> None:
    with serving(tmp_path, "--iqn", TARGET, "--open-access") as server:
        server.ok("pool", "create", "p", "--size", "64M")
        server.ok("vdisk", "create", "gone", "--pool", "p", "--size", "16M")
        initiator = RawInitiator(server.iscsi_port, HOST)
        try:
            initiator.login(TARGET)
            assert initiator.command(0, bytes(6)).status == 0
            server.ok("vdisk", "delete", "gone")
            replies = [initiator.command(0, struct.pack(">BBQIBB", 0x88, 0, 0, 1, 0, 0), read_length=512) for _ in range(2)]
            assert all(r.status == 2 for r in replies)
            assert sense_of(replies[-1]) == (0x5, 0x25, 0x00), "LOGICAL UNIT NOT SUPPORTED, not LBA OUT OF RANGE"
        finally:
            initiator.close()


def test_a_full_metadata_file_system_says_so(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "meta", "16m") as meta:
        pools = tmp_path / "pools"
        pools.mkdir()
        with serving(meta, "--iqn", TARGET, "--allow-path", str(pools), "--commit-interval", "3600") as server:
            server.ok("pool", "create", "p", "--size", "64M", "--path", str(pools / "p.img"))
            server.ok("vdisk", "create", "v", "--pool", "p", "--size", "16M")
            server.ok("host", "create", "h", "--iqn", HOST)
            server.ok("zone", "add", "h", "v")
            initiator = RawInitiator(server.iscsi_port, HOST)
            try:
                initiator.login(TARGET)
                initiator.command(0, bytes(6))  # the power-on unit attention
                assert initiator.command(0, write16(0, 1, fua=True), b"a" * 512).status == 0
                with metadata_full(Path(server.data)):
                    fua = initiator.command(0, write16(4096, 1, fua=True), b"b" * 512)
                    assert fua.status == 2 and sense_of(fua) == (0x7, 0x27, 0x07), "out of (metadata) space, said so"
                    flush = initiator.command(0, struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0))
                    assert flush.status == 2 and sense_of(flush) == (0x7, 0x27, 0x07)
                assert initiator.command(0, struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0)).status == 0
                data = initiator.command(0, struct.pack(">BBQIBB", 0x88, 0, 4096, 1, 0, 0), read_length=512)
                assert data.status == 0 and data.data == b"b" * 512
            finally:
                initiator.close()
            assert "database or disk is full" in server.log_text()


def test_a_full_pool_is_logged_once_per_episode(server: SanServer) -> None:
    server.ok("pool", "create", "tiny", "--size", "4M")
    server.ok("vdisk", "create", "filler", "--pool", "tiny", "--size", "64M")
    server.ok("host", "create", "full", "--iqn", HOST + "-full")
    server.ok("zone", "add", "full", "filler")
    initiator = RawInitiator(server.iscsi_port, HOST + "-full")
    try:
        initiator.login(TARGET)
        initiator.command(0, bytes(6))
        statuses = [initiator.command(0, write16(seg * 2048, 1), b"x" * 512).status for seg in range(12)]
        assert statuses.count(0) == 4 and statuses[-1] == 2
    finally:
        initiator.close()
    assert server.log_text().count("pool tiny is out of space") == 1
    server.ok("zone", "remove", "full", "filler")
    server.ok("vdisk", "delete", "filler")
    assert "pool tiny has free space again" in server.log_text()
    server.ok("host", "delete", "full")
    server.ok("pool", "delete", "tiny")


def test_a_full_backing_file_system_is_logged_once_per_episode(tmp_path: Path) -> None:
    with (
        small_filesystem(tmp_path / "small", "32m") as small,
        serving(tmp_path / "srv", "--iqn", TARGET, "--allow-path", str(small)) as server,
    ):
        server.ok("pool", "create", "sparse", "--size", "24M", "--path", str(small / "sparse.img"))
        server.ok("vdisk", "create", "v", "--pool", "sparse", "--size", "100M")
        server.ok("host", "create", "h", "--iqn", HOST)
        server.ok("zone", "add", "h", "v")
        filler = fill(small)
        initiator = RawInitiator(server.iscsi_port, HOST)
        try:
            initiator.login(TARGET)
            initiator.command(0, bytes(6))
            replies = [initiator.command(0, write16(seg * 2048, 16), os.urandom(8192)) for seg in range(6)]
            failed = [r for r in replies if r.status != 0]
            assert failed and all(sense_of(r) == (0x7, 0x27, 0x07) for r in failed)
        finally:
            initiator.close()
            os.unlink(filler)
        log = server.log_text()
        assert log.count("is full") == 1 and str(small) in log, [line for line in log.splitlines() if "full" in line]
        listed = subprocess.run(["df", str(small)], capture_output=True, text=True, check=False)
        assert listed.returncode == 0
