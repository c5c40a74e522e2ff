"""The controller and two gateways as separate processes, each in its own network namespace (a bridge and veth pairs,
addresses in 198.18.0.0/15, made here and removed after), with real initiators on both gateways against one vdisk:
data written through one gateway reads back through the other; a gateway killed with SIGKILL while it is written
loses no flushed write (read back through the other gateway and through the restarted one); a controller cut off
for longer than the lease stops I/O within lease + 2 s, which completes, correct, once the link is back; and
`san check` is clean after each."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_clean, run_san, san_command
from netns import Net
from rawiscsi import RawInitiator

IQN = "iqn.2003-01.org.san:cluster"
HOST = "iqn.2024-01.org.example:cluster"
LEASE = 2.0
LISTEN = 7100
PORTAL = 3260
API = "http://127.0.0.1:8080"
BLOCK = 512

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def write10(lba: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 1, 0)


def read10(lba: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, 1, 0)


SYNC = struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0)


def pattern(lba: int, gen: int) -> bytes:
    return f"lba={lba} gen={gen};".encode().ljust(BLOCK, b"~")


class Node:
    """One san process in a namespace, its output in a log file."""

    def __init__(self, net: Net, role: str, args: list[str], log: Path) -> None:
        self.net, self.role, self.args, self.log = net, role, args, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*self.net.exec(self.role), *san_command(), *self.args], stdout=out, stderr=out)
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.role} did not stop within 90 s:\n{self.text()[-3000:]}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def open_flags(self, under: Path) -> list[int]:
        """The open-file flags (fdinfo) of each fd the process holds on a file under a directory."""
        assert self.proc is not None
        flags = []
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.proc.pid}/fd/{fd}").startswith(f"{under}/"):
                    info = Path(f"/proc/{self.proc.pid}/fdinfo/{fd}").read_text()
                    flags.append(int(info.split("flags:")[1].split()[0], 8))
        return flags

    def wait_for(self, needle: str, timeout: float = 30.0, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text()[after:]:
                return
            assert self.proc is not None and self.proc.poll() is None, f"{self.role} exited:\n{self.text()[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"{self.role} never logged {needle!r}:\n{self.text()[-3000:]}")


class SanCluster:
    """The three processes; cli() runs `san` in the controller's namespace (its API is on its loopback)."""

    def __init__(self, net: Net, work: Path) -> None:
        self.net, self.work = net, work
        self.certs = work / "cluster"
        self.data = work / "data"
        assert run_san("cluster", "init", str(self.certs), "--nodes", "controller,gw1,gw2").returncode == 0
        controller = ["controller", "--data", str(self.data), "--listen", f"{net.addr('ctl')}:{LISTEN}"]
        controller += ["--cluster", str(self.certs), "--lease", str(LEASE), "--log-level", "debug"]
        self.controller = Node(net, "ctl", controller, work / "controller.log")
        self.gateways = {name: Node(net, name, self.gateway_args(name), work / f"{name}.log") for name in ("gw1", "gw2")}

    def gateway_args(self, name: str) -> list[str]:
        args = ["gateway", "--name", name, "--controller", f"{self.net.addr('ctl')}:{LISTEN}", "--cluster", str(self.certs)]
        args += ["--storage", str(self.data / "pools")]
        if name == "gw2":  # one gateway reads and writes the pool files with direct I/O, as on another host
            args += ["--direct-io", "on"]
        return [*args, "--portal", f"{self.net.addr(name)}:{PORTAL}", "--iqn", IQN, "--suspend-timeout", "60"]

    def start(self) -> None:
        self.controller.start().wait_for("management API on")
        for name, gateway in self.gateways.items():
            gateway.start().wait_for("registered with the controller")
            self.controller.wait_for(f"gateway {name} registered")

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [*self.net.exec("ctl"), *san_command(), "--api", API, *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"san {' '.join(args)}: {result.stderr}"
        return result.stdout

    def initiator(self, gateway: str) -> RawInitiator:
        initiator = RawInitiator(PORTAL, HOST, host=self.net.addr(gateway), timeout=90)
        initiator.login(IQN)
        return initiator

    def qemu_io(self, gateway: str, *commands: str) -> str:
        portal = f"{self.net.addr(gateway)}:{PORTAL}"
        options = f"driver=iscsi,transport=tcp,portal={portal},target={IQN},lun=0,initiator-name={HOST}"
        args = ["qemu-io", "--image-opts", options]
        for command in commands:
            args += ["-c", command]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "fail" not in result.stdout.lower(), result.stdout + result.stderr
        return result.stdout

    def check(self) -> None:
        assert_clean(self.data)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SanCluster]:
    net = Net(["ctl", "gw1", "gw2"])
    san = SanCluster(net, tmp_path)
    try:
        san.start()
        san.cli("pool", "create", "p", "--size", "256M", "--segment-size", "64K")
        san.cli("vdisk", "create", "v", "--pool", "p", "--size", "32M")
        san.cli("host", "create", "h", "--iqn", HOST)
        san.cli("zone", "add", "h", "v", "--lun", "0")
        yield san
    finally:
        for gateway in san.gateways.values():
            gateway.stop()
        san.controller.stop()
        net.close()


def test_data_written_through_one_gateway_reads_back_through_the_other(cluster: SanCluster) -> None:
    # The controller counts a host's sessions on every gateway (from their heartbeats: within a lease).
    logged_in = [cluster.initiator("gw1"), cluster.initiator("gw2")]
    deadline = time.monotonic() + 2 * LEASE
    while json.loads(cluster.cli("host", "show", "h", "--json"))["sessions"] != 2:
        assert time.monotonic() < deadline, cluster.cli("host", "show", "h", "--json")
        time.sleep(0.2)
    for initiator in logged_in:
        initiator.close()
    cluster.qemu_io("gw1", "write -P 0x5a 1M 64k", "flush")
    cluster.qemu_io("gw2", "read -P 0x5a 1M 64k", "write -P 0x33 2M 4k", "flush")
    cluster.qemu_io("gw1", "read -P 0x33 2M 4k", "read -P 0 4M 64k")
    # First writes through both at once, into the same new segments: one allocation each, seen by both.
    first = [threading.Thread(target=cluster.qemu_io, args=(gw, "write -P 1 8M 128k", "flush")) for gw in ("gw1", "gw2")]
    for thread in first:
        thread.start()
    for thread in first:
        thread.join()
    cluster.qemu_io("gw1", "read -P 1 8M 128k")
    cluster.qemu_io("gw2", "read -P 1 8M 128k")
    # An unmap through one gateway: the other reads zeros there afterwards.
    cluster.qemu_io("gw2", "discard 1M 64k", "flush")
    cluster.qemu_io("gw1", "read -P 0 1M 64k")
    pools = cluster.data / "pools"
    direct = [bool(flags & os.O_DIRECT) for flags in cluster.gateways["gw2"].open_flags(pools)]
    assert direct and all(direct), "gw2 (--direct-io on) holds its pool files with O_DIRECT"
    assert not any(flags & os.O_DIRECT for flags in cluster.gateways["gw1"].open_flags(pools)), "gw1: buffered"
    cluster.check()


def test_a_gateway_killed_while_written_loses_no_flushed_write(cluster: SanCluster) -> None:
    flushed: dict[int, int] = {}
    stop = threading.Event()
    failure: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(7)
        gen = 0
        try:
            initiator = cluster.initiator("gw1")
            while not stop.is_set():
                batch = {rng.randrange(0, 65536): 0 for _ in range(8)}
                gen += 1
                for lba in batch:
                    if initiator.command(0, write10(lba), pattern(lba, gen)).status != 0:
                        return
                if initiator.command(0, SYNC).status != 0:
                    return
                flushed.update(dict.fromkeys(batch, gen))
        except (OSError, ConnectionError):
            return  # the gateway died under it
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(random.Random(3).uniform(1.0, 2.5))
    cluster.gateways["gw1"].signal(signal.SIGKILL)
    thread.join(timeout=60)
    stop.set()
    assert not failure, failure
    assert len(flushed) > 20, "the writer flushed a few batches before the kill"
    snapshot = dict(flushed)
    reader = cluster.initiator("gw2")
    for lba, gen in snapshot.items():
        data = reader.command(0, read10(lba), read_length=BLOCK).data
        assert data == pattern(lba, gen) or data.startswith(f"lba={lba} gen=".encode()), f"lba {lba} via gw2: {data[:30]!r}"
        assert int(data.split(b"gen=")[1].split(b";")[0]) >= gen, f"lba {lba}: a flushed write was lost"
    reader.close()
    gw1 = cluster.gateways["gw1"]
    mark = len(gw1.text())
    gw1.start().wait_for("registered with the controller", after=mark)
    again = cluster.initiator("gw1")
    for lba, gen in snapshot.items():
        data = again.command(0, read10(lba), read_length=BLOCK).data
        assert int(data.split(b"gen=")[1].split(b";")[0]) >= gen, f"lba {lba} via the restarted gw1"
    again.close()
    cluster.check()


def test_a_controller_cut_off_past_the_lease_stops_io_which_resumes_once_it_is_back(cluster: SanCluster) -> None:
    initiator = cluster.initiator("gw1")
    for lba in range(0, 4096, 128):
        assert initiator.command(0, write10(lba), pattern(lba, 1)).status == 0
    assert initiator.command(0, SYNC).status == 0
    done: list[float] = []
    results: list[tuple[int, float, int, bytes, bytes]] = []
    stop = threading.Event()

    def reader() -> None:
        lba = 0
        while not stop.is_set():
            response = initiator.command(0, read10(lba), read_length=BLOCK)
            results.append((lba, time.monotonic(), response.status, response.sense, response.data))
            done.append(time.monotonic())
            lba = (lba + 128) % 4096

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.5)
    cut = time.monotonic()
    cluster.net.down("ctl")
    time.sleep(LEASE + 4)
    stalled = done[-1]
    assert stalled - cut <= LEASE + 2, f"I/O went on {stalled - cut:.1f} s after the controller was cut off"
    assert time.monotonic() - done[-1] >= 1.5, "I/O waits while the controller is away"
    cluster.net.up("ctl")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and done[-1] == stalled:
        time.sleep(0.1)
    assert done[-1] > stalled, "I/O resumed once the controller was back"
    time.sleep(0.5)
    stop.set()
    thread.join(timeout=30)
    wrong = [
        f"lba {lba} at cut{at - cut:+.1f}s: status {status:#x} sense {sense.hex()} data {data[:24]!r}"
        for lba, at, status, sense, data in results
        if data != pattern(lba, 1)
    ]
    assert not wrong, f"every read, before and after, returned its data; {len(wrong)} did not: {wrong[:5]}"
    initiator.close()
    cluster.check()
