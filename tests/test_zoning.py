"""Hosts and zoning through the CLI and a real `san serve`, checked with real initiators (libiscsi, qemu-io).

A host sees exactly its zoned LUNs; an unknown initiator sees nothing; CHAP is enforced; read-only is read-only."""

from __future__ import annotations

import re
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SanServer, assert_one_line, serving
from rawiscsi import RawInitiator, Response

TARGET = "iqn.2003-01.org.san:zoning"
ALICE = "iqn.2024-01.org.example:alice"
BOB = "iqn.2024-01.org.example:bob"
STRANGER = "iqn.2024-01.org.example:stranger"
SECRET = "alice-secret-123"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanServer]:
    with serving(tmp_path_factory.mktemp("zoning"), "--iqn", TARGET) as san:
        san.ok("pool", "create", "p", "--size", "1G")
        for name in ("a0", "a1", "b0"):
            san.ok("vdisk", "create", name, "--pool", "p", "--size", "64M")
        san.ok("host", "create", "alice", "--iqn", ALICE, "--chap-user", "alice", "--chap-secret-file", "-", input=SECRET + "\n")
        san.ok("host", "create", "bob", "--iqn", BOB)
        san.ok("zone", "add", "alice", "a0")
        san.ok("zone", "add", "alice", "a1", "--lun", "5")
        san.ok("zone", "add", "bob", "b0", "--read-only")
        yield san


def portal(server: SanServer, user: str = "") -> str:
    return f"iscsi://{user}127.0.0.1:{server.iscsi_port}"


def qemu_io(server: SanServer, initiator: str, lun: int, command: str) -> subprocess.CompletedProcess[str]:
    options = (
        f"driver=iscsi,transport=tcp,portal=127.0.0.1:{server.iscsi_port},target={TARGET},lun={lun},initiator-name={initiator}"
    )
    return run("qemu-io", "--image-opts", options, "-c", command)


def test_zones_are_listed(server: SanServer) -> None:
    zones = server.json("zone", "list")
    assert [(z["host"], z["lun"], z["vdisk"], z["read_only"]) for z in zones] == [
        ("alice", 0, "a0", False),
        ("alice", 5, "a1", False),
        ("bob", 0, "b0", True),
    ]
    alice = server.json("host", "show", "alice")
    assert alice["chap_user"] == "alice" and "chap_secret" not in alice and SECRET not in server.ok("host", "show", "alice")
    assert "one-way" in server.ok("host", "list")


def test_a_host_sees_exactly_its_luns(server: SanServer) -> None:
    alice = run("iscsi-ls", "-s", "-i", ALICE, portal(server, f"alice%{SECRET}@"))
    assert alice.returncode == 0, alice.stderr
    assert re.findall(r"Lun:(\d+)", alice.stdout) == ["0", "5"], alice.stdout
    bob = run("iscsi-ls", "-s", "-i", BOB, portal(server))
    assert re.findall(r"Lun:(\d+)", bob.stdout) == ["0"], bob.stdout


def test_an_unknown_initiator_sees_nothing(server: SanServer) -> None:
    discovery = run("iscsi-ls", "-i", STRANGER, portal(server))
    assert TARGET not in discovery.stdout, discovery.stdout
    login = run("iscsi-inq", "-i", STRANGER, f"{portal(server)}/{TARGET}/0")
    assert login.returncode != 0
    for lun in (0, 1, 5):
        guess = run("iscsi-inq", "-i", BOB, f"{portal(server)}/{TARGET}/{lun}")
        if lun == 0:
            assert guess.returncode == 0, guess.stderr
        else:
            assert guess.returncode != 0 or "Peripheral Qualifier:NOT_SUPPORTED" in guess.stdout, guess.stdout


def test_chap_is_enforced(server: SanServer) -> None:
    url = f"/{TARGET}/0"
    good = run("iscsi-inq", "-i", ALICE, portal(server, f"alice%{SECRET}@") + url)
    assert good.returncode == 0, good.stderr
    wrong = run("iscsi-inq", "-i", ALICE, portal(server, "alice%wrong-secret-99@") + url)
    assert wrong.returncode != 0
    missing = run("iscsi-inq", "-i", ALICE, portal(server) + url)
    assert missing.returncode != 0


def test_a_read_only_zone_refuses_writes(server: SanServer) -> None:
    refused = qemu_io(server, BOB, 0, "write -P 9 0 4096")
    assert refused.returncode != 0 and "write protected" in refused.stderr, refused  # qemu reads the WP bit of MODE SENSE
    read = run(
        "qemu-io",
        "-r",
        "--image-opts",
        f"driver=iscsi,transport=tcp,portal=127.0.0.1:{server.iscsi_port},target={TARGET},lun=0,initiator-name={BOB}",
        "-c",
        "read -P 0 0 4096",
    )
    assert "read 4096/4096" in read.stdout and "Pattern verification failed" not in read.stdout, read
    initiator = RawInitiator(server.iscsi_port, BOB)
    try:
        assert initiator.login(TARGET).bhs[36:38] == b"\0\0"
        write10 = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
        response = initiator.command(0, write10, b"x" * 512)
        assert response.status == 0x02 and (response.sense[2] & 0x0F, response.sense[12]) == (0x7, 0x27), response
    finally:
        initiator.close()
    assert server.vdisks()["b0"]["allocated_bytes"] == 0


def test_zoning_errors_are_one_clear_line(server: SanServer) -> None:
    cases = [
        (("host", "create", "x", "--iqn", "not-an-iqn"), "iSCSI name"),
        (("host", "create", "x", "--iqn", "iqn.2024-01.org.example:x", "--chap-user", "u", "--chap-secret-file", "-"), "secret"),
        (("host", "create", "alice2", "--iqn", ALICE), "already"),
        (("zone", "add", "alice", "b0", "--lun", "5"), "LUN 5"),
        (("zone", "add", "nobody", "b0"), "no host"),
        (("zone", "add", "alice", "nothing"), "no vdisk"),
        (("zone", "remove", "bob", "a0"), "not zoned"),
        (("vdisk", "delete", "a0"), "zoned to alice"),
        (("host", "delete", "alice"), "remove its zones first"),
    ]
    before = server.get("/zones"), server.get("/hosts")
    for args, message in cases:
        result = server.run(*args, input="short\n")
        assert result.returncode != 0, args
        assert message in assert_one_line(result.stderr), (args, result.stderr)
    assert (server.get("/zones"), server.get("/hosts")) == before, "a refused command changes nothing"


def test_zoning_changes_reach_new_logins(server: SanServer) -> None:
    server.ok("vdisk", "create", "late", "--pool", "p", "--size", "16M")
    server.ok("zone", "add", "bob", "late", "--lun", "3")
    bob = run("iscsi-ls", "-s", "-i", BOB, portal(server))
    assert re.findall(r"Lun:(\d+)", bob.stdout) == ["0", "3"], bob.stdout
    server.ok("zone", "remove", "bob", "late")
    server.ok("vdisk", "delete", "late")
    bob = run("iscsi-ls", "-s", "-i", BOB, portal(server))
    assert re.findall(r"Lun:(\d+)", bob.stdout) == ["0"], bob.stdout


def sense_of(response: Response) -> tuple[int, int, int]:
    return response.sense[2] & 0x0F, response.sense[12], response.sense[13]


def test_zoning_changes_reach_live_sessions(server: SanServer) -> None:
    initiator = RawInitiator(server.iscsi_port, BOB)
    try:
        assert initiator.login(TARGET).bhs[36:38] == b"\0\0"
        assert initiator.command(0, bytes(6)).status == 0
        server.ok("vdisk", "create", "live", "--pool", "p", "--size", "16M")
        server.ok("zone", "add", "bob", "live", "--lun", "7")
        response = initiator.command(0, bytes(6))
        assert response.status == 0x02 and sense_of(response) == (0x6, 0x3F, 0x0E), "REPORTED LUNS DATA HAS CHANGED"
        report = initiator.command(0, struct.pack(">B5xIxx", 0xA0, 4096), read_length=4096)
        assert report.status == 0 and report.data[8:24] == bytes([0, 0]) + bytes(6) + bytes([0, 7]) + bytes(6)
        assert initiator.command(7, bytes(6)).status == 0, "the new LUN answers on the live session"
        server.ok("zone", "remove", "bob", "live")
        assert initiator.command(0, bytes(6)).status == 0x02
        gone = initiator.command(7, bytes(6))
        assert gone.status == 0x02 and sense_of(gone)[:2] == (0x5, 0x25), "the removed LUN is not supported any more"
    finally:
        initiator.close()
    server.ok("vdisk", "delete", "live")


def test_a_pool_past_its_warning_threshold_tells_each_nexus_once(server: SanServer) -> None:
    server.ok("pool", "create", "small", "--size", "8M", "--warn-percent", "50")
    server.ok("vdisk", "create", "fill", "--pool", "small", "--size", "8M")
    server.ok("zone", "add", "bob", "fill", "--lun", "9")
    initiator = RawInitiator(server.iscsi_port, BOB)
    try:
        assert initiator.login(TARGET).bhs[36:38] == b"\0\0"
        seen: list[tuple[int, int, int]] = []  # the attention may come with one of the writes, or after them
        for segment in (7, 5, 3, 1, 6):
            lba = segment * 2048
            response = initiator.command(9, struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 1, 0), b"x" * 512)
            if response.status == 0x02:
                seen.append(sense_of(response))
                response = initiator.command(9, struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 1, 0), b"x" * 512)
            assert response.status == 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not seen:
            response = initiator.command(9, bytes(6))
            if response.status == 0x02:
                seen.append(sense_of(response))
            time.sleep(0.1)
        assert seen == [(0x6, 0x38, 0x07)], "THIN PROVISIONING SOFT THRESHOLD REACHED"
        assert initiator.command(9, bytes(6)).status == 0, "once per nexus"
        assert server.json("pool", "show", "small")["used_percent"] >= 50
    finally:
        initiator.close()
    server.ok("zone", "remove", "bob", "fill")
    server.ok("vdisk", "delete", "fill")
    server.ok("pool", "delete", "small")


def test_mutual_chap_proves_both_sides(server: SanServer, tmp_path: Path) -> None:
    carol = "iqn.2024-01.org.example:carol"
    mutual_file = tmp_path / "mutual"
    mutual_file.write_text("target-secret-2\n")
    server.ok(
        "host",
        "create",
        "carol",
        "--iqn",
        carol,
        "--chap-user",
        "carol",
        "--chap-secret-file",
        "-",
        "--mutual-user",
        "target",
        "--mutual-secret-file",
        str(mutual_file),
        input="carol-secret-1\n",
    )
    try:
        initiator = RawInitiator(server.iscsi_port, carol)
        try:
            keys = initiator.login_chap(TARGET, "carol", "carol-secret-1", "target-secret-2")
            assert keys["CHAP_N"] == "target"
            assert initiator.command(0, struct.pack(">B5xIxx", 0xA0, 64), read_length=64).status == 0
        finally:
            initiator.close()
        for secret, mutual in (
            ("carol-secret-1", "a-wrong-guess!"),
            ("wrong-secret-9", "target-secret-2"),
            ("carol-secret-1", ""),
        ):
            initiator = RawInitiator(server.iscsi_port, carol)
            try:
                with pytest.raises(ConnectionError):
                    initiator.login_chap(TARGET, "carol", secret, mutual)
            finally:
                initiator.close()
    finally:
        server.ok("host", "delete", "carol")
