"""Snapshots through the CLI and a real `san serve`, read by real initiators: qemu-img copies a snapshot zoned
read-only, while qemu-io writes to its vdisk, and gets exactly the image the vdisk had when it was taken."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SanServer, assert_one_line, serving

TARGET = "iqn.2003-01.org.san:snapshots"
WRITER = "iqn.2024-01.org.example:writer"
BACKUP = "iqn.2024-01.org.example:backup"
SIZE = 32 << 20


def options(server: SanServer, initiator: str, lun: int = 0) -> str:
    portal = f"127.0.0.1:{server.iscsi_port}"
    return f"driver=iscsi,transport=tcp,portal={portal},target={TARGET},lun={lun},initiator-name={initiator}"


def qemu_io(server: SanServer, initiator: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "--image-opts", options(server, initiator)]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def image_of(server: SanServer, initiator: str, out: Path) -> str:
    """The whole LUN copied with qemu-img convert; its sha256."""
    copied = subprocess.run(
        ["qemu-img", "convert", "--image-opts", options(server, initiator), "-O", "raw", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    return hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SanServer]:
    with serving(tmp_path, "--iqn", TARGET) as san:
        san.ok("pool", "create", "p", "--size", "256M", "--segment-size", "1M")
        san.ok("vdisk", "create", "v", "--pool", "p", "--size", str(SIZE))
        san.ok("host", "create", "writer", "--iqn", WRITER)
        san.ok("host", "create", "backup", "--iqn", BACKUP)
        san.ok("zone", "add", "writer", "v")
        yield san


def test_qemu_img_reads_a_snapshot_as_it_was_while_its_vdisk_is_written(server: SanServer, tmp_path: Path) -> None:
    wrote = qemu_io(server, WRITER, "write -P 0x11 0 12M", "write -P 0x22 20M 3M", "flush")
    assert wrote.returncode == 0 and "fail" not in wrote.stdout.lower(), wrote.stdout + wrote.stderr
    before = image_of(server, WRITER, tmp_path / "before.img")
    assert "snapshot v@backup taken" in server.ok("snapshot", "create", "v", "backup")
    stop = threading.Event()
    failures: list[str] = []

    def keep_writing() -> None:
        rounds = 0
        while not stop.is_set() and rounds < 200:
            offset = (rounds * 7 % 30) << 20
            result = qemu_io(server, WRITER, f"write -P {0x30 + rounds % 64} {offset} 64k", f"write -P 0x55 {offset + 4096} 4k")
            if result.returncode != 0 or "fail" in result.stdout.lower():
                failures.append(result.stdout + result.stderr)
            rounds += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        refused = server.fails("zone", "add", "backup", "v@backup")
        assert "read-only" in assert_one_line(refused.stderr)
        server.ok("zone", "add", "backup", "v@backup", "--read-only")
        copies = [image_of(server, BACKUP, tmp_path / f"snapshot{i}.img") for i in range(2)]
    finally:
        stop.set()
        writer.join(timeout=300)
    assert not failures, failures[:1]
    assert copies == [before, before], "the snapshot reads as the vdisk was when it was taken, while it is written"
    assert image_of(server, WRITER, tmp_path / "after.img") != before, "the vdisk itself moved on"
    denied = qemu_io(server, BACKUP, "write -P 1 0 4k")
    assert denied.returncode != 0 or "fail" in denied.stdout.lower(), "a snapshot takes no writes"


def test_snapshots_are_listed_shown_and_deleted_like_lvs_and_rbd_show_them(server: SanServer) -> None:
    server.ok("zone", "remove", "writer", "v")
    server.ok("snapshot", "create", "v", "one")
    server.ok("snapshot", "create", "v", "two")
    listing = server.ok("snapshot", "list", "v").splitlines()
    assert listing[0].split() == ["NAME", "VDISK", "SIZE", "TAKEN", "STATE"]
    assert [line.split()[0] for line in listing[1:]] == ["v@one", "v@two"], "oldest first"
    assert [s["name"] for s in json.loads(server.ok("snapshot", "list", "--json"))] == ["v@one", "v@two"]
    assert [v["name"] for v in json.loads(server.ok("vdisk", "list", "--json"))] == ["v"], "snapshots are not vdisks here"
    shown = server.ok("snapshot", "show", "v@one")
    assert shown == server.ok("vdisk", "show", "v@one"), "a snapshot is shown as a vdisk is"
    assert any(line.split()[-1] == "v" for line in shown.splitlines() if line.startswith("snapshot of"))
    assert json.loads(server.ok("vdisk", "show", "v", "--json"))["snapshots"] == ["v@one", "v@two"]
    for args, words in [
        (("snapshot", "create", "v", "one"), "already exists"),
        (("snapshot", "create", "nope", "x"), "no vdisk"),
        (("snapshot", "create", "v", "bad name"), "invalid snapshot name"),
        (("snapshot", "delete", "v"), "not a snapshot name"),
        (("vdisk", "delete", "v"), "delete them first"),
        (("vdisk", "grow", "v@one", "--size", "64M"), "read-only"),
    ]:
        assert words in assert_one_line(server.fails(*args).stderr), args
    server.ok("zone", "add", "backup", "v@two", "--read-only")
    assert "zoned" in assert_one_line(server.fails("snapshot", "delete", "v@two").stderr)
    server.ok("zone", "remove", "backup", "v@two")
    assert "v@one deleted" in server.ok("snapshot", "delete", "v@one")
    server.ok("snapshot", "delete", "v@two")
    assert json.loads(server.ok("snapshot", "list", "v", "--json")) == []
    server.ok("vdisk", "delete", "v")  # (the fixture stops it, and `san check` must find the store clean)
