"""Resource limits against denial of service: iSCSI connections capped per source address and in all (the API and
other addresses keep working), running out of descriptors logged, and map tables that cost memory for what is
mapped, not for the size of the vdisk.

The originals: about 20,000 idle connections exhausted the descriptors (no logins, no API, nothing logged); a 16T
thin vdisk on a 1 GiB pool raised the server's RSS by 3.1 GB in one call."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SanServer, serving
from rawiscsi import RawInitiator

TARGET = "iqn.2003-01.org.san:limits"
ALICE = "iqn.2024-01.org.example:limits-alice"
PER_ADDRESS = 16
TOTAL = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanServer]:
    extra = ("--iqn", TARGET, "--max-connections", str(TOTAL), "--max-connections-per-address", str(PER_ADDRESS))
    with serving(tmp_path_factory.mktemp("limits"), *extra) as san:
        san.ok("pool", "create", "p", "--size", "1G")
        san.ok("vdisk", "create", "v", "--pool", "p", "--size", "64M")
        san.ok("host", "create", "alice", "--iqn", ALICE)
        san.ok("zone", "add", "alice", "v")
        yield san


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def still_open(sockets: list[socket.socket], wait: float = 1.0) -> list[socket.socket]:
    """The sockets the server has not closed after wait seconds."""
    time.sleep(wait)
    alive = []
    for sock in sockets:
        sock.setblocking(False)
        try:
            closed = sock.recv(1) == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        if not closed:
            alive.append(sock)
    return alive


def flood(server: SanServer, count: int, source: str) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", server.iscsi_port))
        sockets.append(sock)
    return sockets


def test_idle_connections_are_capped_and_others_still_get_in(server: SanServer) -> None:
    sockets = flood(server, 500, "127.0.0.1")
    try:
        assert len(still_open(sockets)) == PER_ADDRESS, "one address keeps at most its share"
        assert server.http("GET", "/status")[0] == 200, "the API is not starved"
        other = RawInitiator(server.iscsi_port, ALICE, source="127.0.0.2")
        try:
            assert other.login(TARGET).bhs[36] == 0, "another address logs in"
            assert other.command(0, bytes([0x00]) + bytes(5)).status == 0
        finally:
            other.close()
        time.sleep(0.5)  # its slot is given back once the server has seen it close
        sockets += [s for n in range(3, 6) for s in flood(server, PER_ADDRESS, f"127.0.0.{n}")]
        assert len(still_open(sockets)) == TOTAL, "and all addresses together at most the total"
        fds = len(list(Path(f"/proc/{server.proc.pid}/fd").iterdir())) if server.proc else 0
        assert fds < TOTAL + 200, f"{fds} descriptors open in the server"
        log = server.log_text()
        assert "refusing iSCSI connections from 127.0.0.1" in log
        assert log.count("refusing iSCSI connections from 127.0.0.1") == 1, "one line a minute per address, not one per refusal"
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(0.5)
    again = RawInitiator(server.iscsi_port, ALICE)
    try:
        assert again.login(TARGET).bhs[36] == 0, "once they are gone, the address is welcome again"
    finally:
        again.close()


CHILD = textwrap.dedent(
    """
    import asyncio, logging, resource, socket, sys
    from san.iscsi.server import IscsiServer, Limits
    from san.iscsi.target import Target

    logging.basicConfig(level="INFO", stream=sys.stdout, format="%(levelname)s %(message)s")
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    async def main():
        target = Target("iqn.2003-01.org.san:fds", [("127.0.0.1", int(sys.argv[1]))], lambda name: None)
        server = IscsiServer(target, Limits(10000, 10000))
        await server.start()
        print("listening", flush=True)
        await asyncio.sleep(float(sys.argv[2]))
        await server.stop()

    asyncio.run(main())
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_running_out_of_descriptors_is_logged_once_and_survived(tmp_path: Path) -> None:
    port = _free_port()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(port), "14"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "listening"
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        time.sleep(2)
        for sock in sockets:
            sock.close()
        time.sleep(2)
        late = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.5)
        late.close()
        output, _ = child.communicate(timeout=30)
    finally:
        child.kill()
    assert output.count("cannot accept iSCSI connections: Too many open files") == 1, output
    assert "accepting iSCSI connections again" in output, output


def test_a_huge_thin_vdisk_costs_memory_for_what_it_maps(server: SanServer) -> None:
    assert server.proc is not None
    before = rss_kib(server.proc.pid)
    server.ok("vdisk", "create", "huge", "--pool", "p", "--size", "16T")
    server.ok("vdisk", "create", "huger", "--pool", "p", "--size", "256T")
    after = rss_kib(server.proc.pid)
    assert after - before < 32 * 1024, f"RSS grew by {after - before} KiB for two empty thin vdisks"
    server.ok("zone", "add", "alice", "huge")
    reads = [arg for n in range(0, 16 << 10, 16) for arg in ("-c", f"read {n}G 4k")]  # 1,024 reads, one every 16 GiB
    options = f"driver=iscsi,transport=tcp,portal=127.0.0.1:{server.iscsi_port},target={TARGET},lun=1,initiator-name={ALICE}"
    result = subprocess.run(
        ["qemu-io", "--image-opts", options, *reads], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0 and result.stdout.count("read 4096/4096") == 1024, result.stdout[-500:] + result.stderr
    grown = rss_kib(server.proc.pid)
    assert grown - before < 48 * 1024, f"RSS grew by {grown - before} KiB after reading across 16 TiB of unmapped space"
    server.ok("zone", "remove", "alice", "huge")
    server.ok("vdisk", "delete", "huge")
    server.ok("vdisk", "delete", "huger")
