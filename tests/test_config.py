"""`san config export` and `san config import` against a real `san serve`: export, wipe, import gives back the same
configuration (compared as JSON); a conflict is one line each and changes nothing; secrets only when asked for."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SanServer, serving

SECRET = "a-chap-secret-of-16+"
MUTUAL = "a-mutual-secret-16+"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SanServer]:
    with serving(tmp_path) as san:
        san.ok("pool", "create", "fast", "--size", "256M", "--segment-size", "64K", "--warn-percent", "70")
        san.ok("pool", "create", "slow", "--size", "512M")
        san.ok("vdisk", "create", "vm1", "--pool", "fast", "--size", "40M")
        san.ok("vdisk", "create", "vm2", "--pool", "slow", "--size", "64M", "--block-size", "4096")
        san.ok("vdisk", "create", "fat", "--pool", "fast", "--size", "8M", "--thick")
        secrets = Path(san.cwd) / "mutual"
        secrets.write_text(MUTUAL + "\n")
        secrets.chmod(0o600)
        san.ok("host", "create", "web", "--iqn", "iqn.2024-01.org.example:web", "--chap-user", "web",
               "--chap-secret-file", "-", "--mutual-user", "target", "--mutual-secret-file", str(secrets),
               input=SECRET + "\n")  # fmt: skip
        san.ok("host", "create", "backup", "--iqn", "iqn.2024-01.org.example:backup")
        san.ok("zone", "add", "web", "vm1", "--lun", "0")
        san.ok("zone", "add", "web", "vm2", "--lun", "3")
        san.ok("zone", "add", "backup", "vm1", "--lun", "1", "--read-only")
        yield san


def everything(san: SanServer) -> Any:
    return san.get("/pools"), san.get("/vdisks"), san.get("/hosts?secrets=true"), san.get("/zones")


def wipe(san: SanServer) -> None:
    for zone in san.get("/zones"):
        san.ok("zone", "remove", zone["host"], zone["vdisk"])
    for host in san.get("/hosts"):
        san.ok("host", "delete", host["name"])
    for vdisk in san.get("/vdisks"):
        san.ok("vdisk", "delete", vdisk["name"])
    for pool in san.get("/pools"):
        san.ok("pool", "delete", pool["name"])


def test_export_wipe_import_gives_back_the_same_configuration(server: SanServer, tmp_path: Path) -> None:
    saved = tmp_path / "saved.json"
    said = server.ok("config", "export", "--out", str(saved), "--with-secrets")
    assert said.strip() == f"configuration saved to {saved} (2 pools, 3 vdisks, 2 hosts, 3 zones)"
    assert saved.stat().st_mode & 0o777 == 0o600
    document = json.loads(saved.read_text())
    assert {h["name"]: h["chap_secret"] for h in document["hosts"]} == {"web": SECRET, "backup": ""}
    wipe(server)
    assert everything(server) == ([], [], [], [])
    dry = server.ok("config", "import", str(saved), "--dry-run")
    assert dry.splitlines()[-1] == "10 change(s), 0 unchanged (dry run: nothing was changed)"
    assert "would create pool fast" in dry and "would add zone backup/vm1 at LUN 1" in dry
    assert everything(server) == ([], [], [], [])
    done = server.ok("config", "import", str(saved))
    assert done.splitlines()[-1] == "10 change(s), 0 unchanged"
    again = json.loads(server.ok("config", "export", "--with-secrets"))
    assert again == document
    assert server.vdisks()["vm2"]["block_size"] == 4096 and server.vdisks()["fat"]["thin"] is False
    assert server.ok("config", "import", str(saved)).splitlines()[-1] == "0 change(s), 10 unchanged"


def test_a_second_export_keeps_the_first_as_a_dated_backup(server: SanServer, tmp_path: Path) -> None:
    saved = tmp_path / "saved.json"
    server.ok("config", "export", "--out", str(saved))
    first = saved.read_text()
    server.ok("vdisk", "create", "vm3", "--pool", "slow", "--size", "1M")
    said = server.ok("config", "export", "--out", str(saved))
    backups = list((tmp_path / "backup").iterdir())
    assert len(backups) == 1 and backups[0].read_text() == first and str(backups[0]) in said
    assert backups[0].stat().st_mode & 0o777 == 0o600
    assert "vm3" in saved.read_text() and not list(tmp_path.glob("*.tmp"))


def test_without_secrets_no_secret_leaves_and_such_a_file_cannot_make_a_chap_host(server: SanServer, tmp_path: Path) -> None:
    exported = server.ok("config", "export")
    assert SECRET not in exported and MUTUAL not in exported and "chap_secret" not in exported
    saved = tmp_path / "plain.json"
    saved.write_text(exported)
    server.ok("zone", "remove", "web", "vm1")
    server.ok("zone", "remove", "web", "vm2")
    server.ok("host", "delete", "web")
    before = everything(server)
    refused = server.run("config", "import", str(saved))
    assert refused.returncode == 1
    lines = refused.stderr.splitlines()
    assert lines[0] == "san: 2 conflict(s); nothing was changed:"
    assert lines[1:] == [
        "host web has a chap_user but the file holds no secret for it (export with --with-secrets)",
        "host web has a mutual_user but the file holds no secret for it (export with --with-secrets)",
    ]
    assert everything(server) == before


def test_conflicts_are_one_line_each_and_change_nothing(server: SanServer, tmp_path: Path) -> None:
    document = json.loads(server.ok("config", "export", "--with-secrets"))
    document["pools"][0]["segment_size"] = 1 << 20
    document["vdisks"] = [dict(v, block_size=512) if v["name"] == "vm2" else v for v in document["vdisks"]]
    document["vdisks"].append({"name": "new", "pool": "slow", "size": 1 << 20, "block_size": 512, "thin": True})
    document["zones"].append({"host": "backup", "vdisk": "vm2", "lun": 1, "read_only": False})
    saved = tmp_path / "changed.json"
    saved.write_text(json.dumps(document))
    before = everything(server)
    refused = server.run("config", "import", str(saved))
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        "san: 3 conflict(s); nothing was changed:",
        "pool fast exists with another segment_size",
        "vdisk vm2 exists with another block_size",
        "zone backup/vm2: host backup already sees vm1 at LUN 1",
    ]
    assert everything(server) == before, "the new vdisk must not be made when anything conflicts"


def test_a_grown_vdisk_in_the_file_grows_and_a_failed_step_undoes_the_import(server: SanServer, tmp_path: Path) -> None:
    document = json.loads(server.ok("config", "export", "--with-secrets"))
    document["vdisks"] = [dict(v, size=48 << 20) if v["name"] == "vm1" else v for v in document["vdisks"]]
    saved = tmp_path / "grown.json"
    saved.write_text(json.dumps(document))
    assert "grow vdisk vm1 to 50331648 bytes" in server.ok("config", "import", str(saved))
    assert server.vdisks()["vm1"]["size_bytes"] == 48 << 20
    # The last step fails (a LUN past the largest): the pool, the thin and thick vdisks, the host and the zone this
    # import made before it are deleted again, in reverse.
    document["pools"].append({"name": "first", "segment_size": 1 << 20, "warn_percent": 80, "allocate_ahead": 4,
                              "size": 64 << 20})  # fmt: skip
    document["vdisks"] += [{"name": "later", "pool": "first", "size": 1 << 20, "block_size": 512, "thin": True},
                           {"name": "thick2", "pool": "first", "size": 4 << 20, "block_size": 512, "thin": False}]  # fmt: skip
    document["hosts"].append({"name": "new", "iqn": "iqn.2024-01.org.example:new", "chap_user": "", "mutual_user": "",
                              "chap_secret": "", "mutual_secret": ""})  # fmt: skip
    document["zones"] += [{"host": "new", "vdisk": "later", "lun": 0, "read_only": False},
                          {"host": "new", "vdisk": "thick2", "lun": 99999, "read_only": False}]  # fmt: skip
    saved.write_text(json.dumps(document))
    before = everything(server)
    failed = server.run("config", "import", str(saved))
    assert failed.returncode == 1 and failed.stderr.startswith("san: add zone new/thick2 at LUN 99999: "), failed.stderr
    assert failed.stderr.rstrip().endswith("what this import made was deleted again")
    assert everything(server) == before
    assert not os.path.exists(Path(server.data) / "pools" / "first.img")


def test_the_plan_finds_what_would_fail_part_way(server: SanServer, tmp_path: Path) -> None:
    document = json.loads(server.ok("config", "export", "--with-secrets"))
    document["vdisks"].append({"name": "orphan", "pool": "nowhere", "size": 1 << 20, "block_size": 512, "thin": True})
    document["vdisks"].append(dict(document["vdisks"][0]))
    document["hosts"].append({"name": "twin", "iqn": "iqn.2024-01.org.example:web", "chap_user": "", "mutual_user": ""})
    document["zones"] += [{"host": "backup", "vdisk": "vm2", "lun": 7, "read_only": False},
                          {"host": "backup", "vdisk": "fat", "lun": 7, "read_only": False},
                          {"host": "ghost", "vdisk": "vm1", "lun": 0, "read_only": False}]  # fmt: skip
    saved = tmp_path / "bad-plan.json"
    saved.write_text(json.dumps(document))
    before = everything(server)
    refused = server.run("config", "import", str(saved), "--dry-run")
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[1:] == [
        f"the file has vdisks name {document['vdisks'][0]['name']} twice",
        "the file has hosts iqn iqn.2024-01.org.example:web twice",
        "vdisk orphan is in pool nowhere, which neither exists nor is in the file",
        "host twin: iSCSI name iqn.2024-01.org.example:web is host web's already",
        "zone backup/fat: host backup already sees vm2 at LUN 7",
        "zone ghost/vm1: host ghost neither exists nor is in the file",
    ]
    assert everything(server) == before


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json", "is not a san configuration: Expecting value"),
        ('{"san_config": 2}', "is not a san configuration (format 1)"),
        ('{"san_config": 1, "vdisks": [{"name": "x"}]}', "an entry of vdisks (x): missing pool, size, block_size, thin"),
        ('{"san_config": 1, "zones": {}}', "zones must be a list of objects"),
    ],
)
def test_a_bad_file_is_one_line_and_changes_nothing(server: SanServer, tmp_path: Path, content: str, expected: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    before = everything(server)
    result = server.run("config", "import", str(bad))
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1 and expected in result.stderr, result.stderr
    assert everything(server) == before
