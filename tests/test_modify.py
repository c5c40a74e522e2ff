"""Changing what exists without tearing it down: `san host modify` (CHAP secrets, iSCSI name), `san zone modify`
(LUN, read-only) and `san vdisk rename`, checked with real logins and real data, and every refusal one line."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SanServer, assert_one_line, serving
from rawiscsi import RawInitiator

TARGET = "iqn.2003-01.org.san:modify"
WEB = "iqn.2024-01.org.example:web"
OLD_SECRET, NEW_SECRET = "old-secret-0123", "new-secret-4567"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SanServer]:
    with serving(tmp_path, "--iqn", TARGET) as san:
        san.ok("pool", "create", "p", "--size", "128M")
        san.ok("vdisk", "create", "vm1", "--pool", "p", "--size", "16M")
        san.ok("vdisk", "create", "vm2", "--pool", "p", "--size", "8M")
        san.ok("host", "create", "web", "--iqn", WEB, "--chap-user", "web", "--chap-secret-file", "-", input=OLD_SECRET + "\n")
        san.ok("zone", "add", "web", "vm1", "--lun", "0")
        yield san


def chap_login(san: SanServer, iqn: str, secret: str) -> bool:
    initiator = RawInitiator(san.iscsi_port, iqn)
    try:
        initiator.login_chap(TARGET, "web", secret)
        return True
    except ConnectionError:
        return False
    finally:
        initiator.close()


def luns_seen(san: SanServer, iqn: str) -> list[str]:
    listed = subprocess.run(["iscsi-ls", "-s", "-i", iqn, f"iscsi://127.0.0.1:{san.iscsi_port}"], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    return re.findall(r"Lun:(\d+)", listed.stdout)


def test_a_chap_secret_changes_without_touching_the_zones(server: SanServer, tmp_path: Path) -> None:
    assert chap_login(server, WEB, OLD_SECRET)
    secret = tmp_path / "secret"
    secret.write_text(NEW_SECRET + "\n")
    said = server.ok("host", "modify", "web", "--chap-secret-file", str(secret))
    assert said.strip() == f"host web modified: {WEB}, CHAP user web"
    assert not chap_login(server, WEB, OLD_SECRET), "the old secret no longer logs in"
    assert chap_login(server, WEB, NEW_SECRET)
    assert [z["vdisk"] for z in server.get("/hosts/web")["zones"]] == ["vm1"]


def test_an_iscsi_name_changes_and_the_luns_follow_it(server: SanServer) -> None:
    server.ok("host", "modify", "web", "--no-chap")
    assert luns_seen(server, WEB) == ["0"]
    renamed = "iqn.2024-01.org.example:web2"
    server.ok("host", "modify", "web", "--iqn", renamed)
    assert luns_seen(server, renamed) == ["0"]
    assert luns_seen(server, WEB) == [], "the old name sees nothing now"
    assert server.get("/hosts/web")["iqn"] == renamed


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["web", "--iqn", "not an iqn"], "is not an iSCSI name"),
        (["nobody", "--no-chap"], "no host named 'nobody'"),
        (["web"], "nothing to change"),
        (["web", "--no-chap", "--chap-user", "x"], "--no-chap removes CHAP"),
        (["web", "--chap-secret", "plain"], "is not accepted"),
    ],
)
def test_host_modify_refusals_are_one_line_and_change_nothing(server: SanServer, args: list[str], expected: str) -> None:
    before = server.get("/hosts?secrets=true")
    result = server.run("host", "modify", *args)
    assert result.returncode in (1, 2) and expected in assert_one_line(result.stderr)
    assert server.get("/hosts?secrets=true") == before


def test_an_iscsi_name_another_host_has_is_refused(server: SanServer) -> None:
    server.ok("host", "create", "db", "--iqn", "iqn.2024-01.org.example:db")
    result = server.run("host", "modify", "db", "--iqn", WEB)
    assert result.returncode == 1 and f"{WEB} is already host 'web'" in assert_one_line(result.stderr)


def test_a_zone_moves_to_another_lun_and_becomes_read_only(server: SanServer) -> None:
    server.ok("host", "modify", "web", "--no-chap")
    server.ok("zone", "add", "web", "vm2", "--lun", "1")
    said = server.ok("zone", "modify", "web", "vm1", "--lun", "7", "--read-only")
    assert said.strip() == "host web sees vm1 as LUN 7 (read-only)"
    assert sorted(luns_seen(server, WEB)) == ["1", "7"]
    zones = {z["vdisk"]: z for z in server.get("/zones")}
    assert (zones["vm1"]["lun"], zones["vm1"]["read_only"]) == (7, True)
    server.ok("zone", "modify", "web", "vm1", "--read-write")
    assert {z["vdisk"]: z["read_only"] for z in server.get("/zones")}["vm1"] is False
    taken = server.run("zone", "modify", "web", "vm1", "--lun", "1")
    assert taken.returncode == 1 and "already has LUN 1" in assert_one_line(taken.stderr)
    nothing = server.run("zone", "modify", "web", "vm1")
    assert nothing.returncode == 1 and "give --lun" in assert_one_line(nothing.stderr)
    assert {z["vdisk"]: z["lun"] for z in server.get("/zones")} == {"vm1": 7, "vm2": 1}


def test_a_renamed_vdisk_keeps_its_data_serial_and_zones(server: SanServer) -> None:
    server.ok("host", "modify", "web", "--no-chap")
    options = f"driver=iscsi,transport=tcp,portal=127.0.0.1:{server.iscsi_port},target={TARGET},lun=0,initiator-name={WEB}"
    wrote = subprocess.run(["qemu-io", "--image-opts", "-c", "write -P 0x5a 1M 64K", options], capture_output=True, text=True,
                           timeout=120, check=False)  # fmt: skip
    assert wrote.returncode == 0, wrote.stderr
    serial = server.vdisks()["vm1"]["serial"]
    assert server.ok("vdisk", "rename", "vm1", "database").strip() == "vdisk vm1 renamed database"
    vdisks = server.vdisks()
    assert "vm1" not in vdisks and vdisks["database"]["serial"] == serial
    assert [z["vdisk"] for z in server.get("/hosts/web")["zones"]] == ["database"]
    read = subprocess.run(["qemu-io", "--image-opts", "-c", "read -P 0x5a 1M 64K", options], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read.stdout
    for args, expected in ((["database", "vm2"], "vdisk 'vm2' already exists"), (["nope", "x"], "no vdisk named 'nope'"),
                           (["database", "bad/name"], "invalid vdisk name")):  # fmt: skip
        refused = server.run("vdisk", "rename", *args)
        assert refused.returncode == 1 and expected in assert_one_line(refused.stderr)
    assert sorted(server.vdisks()) == ["database", "vm2"]
