"""The built-in iSCSI target against real initiators: libiscsi's tools, qemu-img and qemu-io.

A real `san serve --open-access` on a loopback portal; every check goes through a real iSCSI login."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SanServer, free_port, san_command, serving

TARGET = "iqn.2003-01.org.san:pytest"
TOOLS = ("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16", "qemu-img", "qemu-io")


def tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    assert not missing, f"{missing} not installed: `make test` installs libiscsi-bin, qemu-utils and qemu-block-extra"
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanServer]:
    with serving(tmp_path_factory.mktemp("iscsi"), "--iqn", TARGET, "--open-access") as san:
        san.ok("pool", "create", "p", "--size", "2G")
        san.ok("vdisk", "create", "disk0", "--pool", "p", "--size", "256M")
        san.ok("vdisk", "create", "disk1", "--pool", "p", "--size", "64M", "--block-size", "4096")
        yield san


def url(server: SanServer, lun: int | None = None) -> str:
    base = f"iscsi://127.0.0.1:{server.iscsi_port}"
    return base if lun is None else f"{base}/{TARGET}/{lun}"


def test_discovery_lists_the_target_and_its_luns(server: SanServer) -> None:
    result = tool("iscsi-ls", "-s", url(server))
    assert result.returncode == 0, result.stderr
    assert f"Target:{TARGET} Portal:127.0.0.1:{server.iscsi_port},1" in result.stdout
    assert re.search(r"Lun:0\s+Type:DIRECT_ACCESS \(Size:255M\)", result.stdout), result.stdout
    assert re.search(r"Lun:1\s+Type:DIRECT_ACCESS \(Size:63M\)", result.stdout), result.stdout


def test_inquiry_and_capacity(server: SanServer) -> None:
    inquiry = tool("iscsi-inq", url(server, 0))
    assert inquiry.returncode == 0 and "Vendor:SAN" in inquiry.stdout and "CmdQue:1" in inquiry.stdout, inquiry
    serial = tool("iscsi-inq", "-e", "1", "-c", "128", url(server, 0))
    vdisk = server.vdisks()["disk0"]
    assert serial.returncode == 0 and vdisk["serial"] in serial.stdout, serial
    capacity = tool("iscsi-readcapacity16", url(server, 1))
    assert capacity.returncode == 0, capacity.stderr
    assert "RETURNED LOGICAL BLOCK ADDRESS:16383" in capacity.stdout
    assert "LOGICAL BLOCK LENGTH IN BYTES:4096" in capacity.stdout
    assert "LBPME:1 LBPRZ:1" in capacity.stdout


def test_qemu_img_round_trip_is_byte_identical(server: SanServer, tmp_path: Path) -> None:
    source = tmp_path / "random.img"
    source.write_bytes(os.urandom(64 << 20))
    put = tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), url(server, 0))
    assert put.returncode == 0, put.stderr
    back = tmp_path / "back.img"
    get = tool("qemu-img", "convert", "-f", "raw", "-O", "raw", url(server, 0), str(back))
    assert get.returncode == 0, get.stderr
    assert back.stat().st_size == 256 << 20
    with back.open("rb") as copy:
        assert copy.read(64 << 20) == source.read_bytes()
        assert copy.read() == bytes((256 - 64) << 20), "the rest of the thin vdisk reads as zeros"


def test_qemu_io_scattered_writes_read_back(server: SanServer) -> None:
    offsets = [0, 4096 * 3, 1 << 20, (5 << 20) + 512, (63 << 20) - 8192]
    for index, offset in enumerate(offsets):
        pattern = 0x11 + index
        write = tool("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} 4096", url(server, 1))
        assert write.returncode == 0 and "wrote 4096/4096" in write.stdout, write
    for index, offset in enumerate(offsets):
        pattern = 0x11 + index
        read = tool("qemu-io", "-f", "raw", "-c", f"read -P {pattern} {offset} 4096", url(server, 1))
        assert read.returncode == 0 and "read 4096/4096" in read.stdout and "Pattern verification failed" not in read.stdout, read
    between = tool("qemu-io", "-f", "raw", "-c", "read -P 0 8192 4096", url(server, 1))
    assert "Pattern verification failed" not in between.stdout, between


def test_zero_writes_to_a_thin_vdisk_allocate_nothing(server: SanServer) -> None:
    server.ok("vdisk", "create", "zeros", "--pool", "p", "--size", "32M")
    lun = sorted(server.vdisks().values(), key=lambda v: v["id"]).index(server.vdisks()["zeros"])
    before = server.vdisks()["zeros"]["allocated_bytes"]
    write = tool("qemu-io", "-f", "raw", "-c", "write -P 0 0 8M", url(server, lun))
    assert write.returncode == 0 and "wrote 8388608/8388608" in write.stdout, write
    assert server.vdisks()["zeros"]["allocated_bytes"] == before == 0
    write = tool("qemu-io", "-f", "raw", "-c", "write -P 7 1M 4096", url(server, lun))
    assert write.returncode == 0, write
    assert server.vdisks()["zeros"]["allocated_bytes"] > 0


def test_demo_serves_a_thin_vdisk_to_any_initiator(tmp_path: Path) -> None:
    api, iscsi = free_port(), free_port()
    command = [*san_command(), "demo", "--data", str(tmp_path / "data"), "--api", f"127.0.0.1:{api}"]
    command += ["--portal", f"127.0.0.1:{iscsi}", "--size", "1G"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(lines)
        assert f"iscsi-ls -s iscsi://127.0.0.1:{iscsi}" in text and "iscsiadm -m discovery" in text and "qemu-img" in text, text
        listing = tool("iscsi-ls", "-s", f"iscsi://127.0.0.1:{iscsi}", "-i", "iqn.2024-01.org.example:anyone")
        assert re.search(r"Lun:0\s+Type:DIRECT_ACCESS", listing.stdout), listing
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
