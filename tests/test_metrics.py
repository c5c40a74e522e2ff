"""Prometheus metrics end to end: a known load through qemu-io over iSCSI, then every per-vdisk counter checked
exactly from /metrics (parsed with prometheus_client's own parser), on `san serve` and on a separate gateway.

The pool, vdisk and gateway figures are checked against what the API says; /metrics needs the token."""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ClusterServer, SanServer, free_port, running_server, serving
from prometheus_client.parser import text_string_to_metric_families
from rawiscsi import RawInitiator

TARGET = "iqn.2003-01.org.san:metrics"
BLOCK = 4096
WRITES, READS, DISCARDS, FLUSHES = 1000, 500, 10, 5
DISCARD_BYTES = 1 << 20
INITIATOR = "iqn.2024-01.org.example:metrics"


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(url: str, token: str | None) -> Samples:
    """/metrics as {sample name: {sorted labels: value}}, parsed by prometheus_client."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        samples.setdefault(family.name, {})  # a family with no sample yet (no grant held) is still served
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def load(portal: int, lun: int, initiator: str = INITIATOR) -> None:
    """1000 writes of 4 KiB at distinct places with a flush after every 200 (qemu sends a flush only when something
    was written since the last one), 10 discards of 1 MiB among the first writes, then 500 reads of 4 KiB: one
    qemu-io session (its INQUIRY and READ CAPACITY when it opens the LUN are not counted)."""
    assert shutil.which("qemu-io"), "qemu-io is not installed: `make test` installs qemu-utils and qemu-block-extra"
    rng = random.Random(11)
    places = rng.sample(range(0, (48 << 20) // BLOCK), WRITES)
    commands = [f"discard {(48 << 20) + i * DISCARD_BYTES} {DISCARD_BYTES}" for i in range(DISCARDS)]
    for i, place in enumerate(places):
        commands.append(f"write -P {1 + i % 250} {place * BLOCK} {BLOCK}")
        if (i + 1) % (WRITES // FLUSHES) == 0:
            commands.append("flush")
    commands += [f"read {place * BLOCK} {BLOCK}" for place in places[:READS]]
    args = ["qemu-io", "--image-opts"]
    for command in commands:
        args += ["-c", command]
    args.append(
        f"driver=iscsi,transport=tcp,portal=127.0.0.1:{portal},target={TARGET},lun={lun},initiator-name={initiator},discard=unmap"
    )
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count(f"wrote {BLOCK}/{BLOCK}") == WRITES
    assert done.stdout.count(f"read {BLOCK}/{BLOCK}") == READS
    assert done.stdout.count(f"discard {DISCARD_BYTES}/{DISCARD_BYTES}") == DISCARDS


def check_io(before: Samples, after: Samples, vdisk: str) -> None:
    """The load and nothing else, counted exactly; the histograms count what the counters count."""
    expected = {
        "read": (READS, READS * BLOCK),
        "write": (WRITES, WRITES * BLOCK),
        "unmap": (DISCARDS, DISCARDS * DISCARD_BYTES),
        "flush": (FLUSHES, 0),
    }

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - before.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    for kind, (commands, nbytes) in expected.items():
        where = {"vdisk": vdisk, "op": kind}
        assert delta("san_vdisk_commands_total", **where) == commands, kind
        assert delta("san_vdisk_bytes_total", **where) == nbytes, kind
        assert delta("san_vdisk_errors_total", **where) == 0, kind
        assert delta("san_vdisk_latency_seconds_count", **where) == commands, kind
        assert delta("san_vdisk_latency_seconds_bucket", **where, le="+Inf") == commands, kind
        assert delta("san_vdisk_latency_seconds_sum", **where) > 0, kind
        buckets = sorted(
            ((float(dict(labels)["le"]), count) for labels, count in after["san_vdisk_latency_seconds_bucket"].items()
             if dict(labels)["vdisk"] == vdisk and dict(labels)["op"] == kind),
        )  # fmt: skip
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), f"{kind}: buckets must be cumulative"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanServer]:
    with serving(tmp_path_factory.mktemp("metrics"), "--iqn", TARGET, "--open-access") as san:
        san.ok("pool", "create", "p", "--size", "1G")
        san.ok("vdisk", "create", "vm1", "--pool", "p", "--size", "64M")
        yield san


def test_a_known_load_is_counted_exactly(server: SanServer) -> None:
    url = f"{server.api}/metrics"
    before = scrape(url, server.token)
    load(server.iscsi_port, 0)
    after = scrape(url, server.token)
    check_io(before, after, "vm1")


def test_a_read_counts_the_bytes_sent_when_the_initiator_asked_for_fewer(server: SanServer) -> None:
    """READ (10) of 8 blocks with an expected length of 2 of them (an overflow): the initiator is sent 2 blocks and
    that is what is counted, on the fast path as well (which counts a read's blocks in C as it is done)."""
    block = server.vdisks()["vm1"]["block_size"]
    initiator = RawInitiator(server.iscsi_port, INITIATOR)
    try:
        assert initiator.login(TARGET).bhs[36:38] == b"\0\0"
        initiator.command(0, bytes(6))  # TEST UNIT READY takes the unit attention a new nexus is owed
        write = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0)
        assert initiator.command(0, write, data_out=b"\x5a" * (8 * block)).status == 0
        read = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0)
        before = scrape(f"{server.api}/metrics", server.token)
        whole = initiator.command(0, read, read_length=8 * block)
        short = initiator.command(0, read, read_length=2 * block)
        after = scrape(f"{server.api}/metrics", server.token)
    finally:
        initiator.close()
    assert whole.status == short.status == 0
    assert whole.data == b"\x5a" * (8 * block) and short.data == b"\x5a" * (2 * block)
    where = {"vdisk": "vm1", "op": "read"}
    assert value(after, "san_vdisk_commands_total", **where) - value(before, "san_vdisk_commands_total", **where) == 2
    assert value(after, "san_vdisk_bytes_total", **where) - value(before, "san_vdisk_bytes_total", **where) == 10 * block


def test_reads_counted_are_the_bytes_sent_and_only_commands_answered(server: SanServer) -> None:
    """A READ (10) without the R bit (expected length 0) is answered with no data: it counts no bytes, though the
    fast path read its blocks. A READ sent in one segment with a PDU that ends the connection is never answered and
    is not counted."""
    block = server.vdisks()["vm1"]["block_size"]
    read = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0)
    where = {"vdisk": "vm1", "op": "read"}
    initiator = RawInitiator(server.iscsi_port, INITIATOR)
    try:
        assert initiator.login(TARGET).bhs[36:38] == b"\0\0"
        initiator.command(0, bytes(6))  # TEST UNIT READY takes the unit attention a new nexus is owed
        initiator.command(0, read, read_length=8 * block)
        before = scrape(f"{server.api}/metrics", server.token)
        assert initiator.command(0, read).data == b""
        middle = scrape(f"{server.api}/metrics", server.token)
        command = struct.pack(">BBH I 2s6x I I I I 16s", 0x01, 0xC1, 0, 0, bytes(2), 0x77, 8 * block, initiator.cmd_sn, 0,
                              read.ljust(16, b"\0"))  # fmt: skip
        huge = bytearray(48)
        huge[0], huge[1], huge[5:8], huge[16:20] = 0x40, 0x80, b"\xff\xff\xff", b"\xff" * 4  # a NOP-Out of 16 MiB
        initiator.sock.sendall(command + bytes(huge))
        with contextlib.suppress(OSError):
            while initiator.sock.recv(65536):
                pass
        after = scrape(f"{server.api}/metrics", server.token)
    finally:
        initiator.close()
    assert value(middle, "san_vdisk_commands_total", **where) - value(before, "san_vdisk_commands_total", **where) == 1
    assert value(middle, "san_vdisk_bytes_total", **where) == value(before, "san_vdisk_bytes_total", **where)
    assert value(after, "san_vdisk_commands_total", **where) == value(middle, "san_vdisk_commands_total", **where)
    assert value(after, "san_vdisk_bytes_total", **where) == value(middle, "san_vdisk_bytes_total", **where)


def test_pool_and_vdisk_figures_match_the_api(server: SanServer) -> None:
    samples = scrape(f"{server.api}/metrics", server.token)
    pool, vdisk = server.pools()["p"], server.vdisks()["vm1"]
    assert value(samples, "san_pool_capacity_bytes", pool="p") == pool["capacity_bytes"]
    assert value(samples, "san_pool_used_bytes", pool="p") == pool["used_bytes"]
    assert value(samples, "san_pool_provisioned_bytes", pool="p") == pool["provisioned_bytes"] == 64 << 20
    assert value(samples, "san_pool_online", pool="p") == 1
    assert value(samples, "san_pool_reserve_bytes", pool="p") >= 0
    assert value(samples, "san_vdisk_size_bytes", vdisk="vm1", pool="p") == 64 << 20
    assert value(samples, "san_vdisk_allocated_bytes", vdisk="vm1", pool="p") == vdisk["allocated_bytes"]
    assert samples["san_metadata_commit_seconds_count"][()] >= 1
    assert value(samples, "san_gateway_registrations_total", gateway="local") == 1


def test_metrics_need_a_token_and_the_metrics_token_reads_nothing_else(server: SanServer) -> None:
    status, _ = server.http("GET", "/metrics", token=None)
    assert status == 401
    status, _ = server.http("GET", "/metrics", token="not-the-token-at-all")
    assert status == 401
    metrics_token = Path(server.data, "metrics-token")
    assert metrics_token.stat().st_mode & 0o777 == 0o600
    token = metrics_token.read_text().strip()
    assert "san_vdisk_commands_total" in scrape(f"{server.api}/metrics", token)
    for path in ("/hosts?secrets=true", "/vdisks", "/status"):
        status, _ = server.http("GET", path, token=token)
        assert status == 401, path


def test_metrics_off_serves_none_and_counts_nothing(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", tmp_path / "cwd", "--metrics", "off") as san:
        status, _ = san.http("GET", "/metrics")
        assert status == 404
        assert san.stop() == 0


def test_a_gateway_serves_its_own_metrics(tmp_path: Path) -> None:
    port = free_port()
    cluster = ClusterServer(tmp_path / "data", tmp_path / "cwd", TARGET, gateway_extra=("--metrics", f"127.0.0.1:{port}"))
    cluster.start()
    try:
        cluster.ok("pool", "create", "p", "--size", "1G")
        cluster.ok("vdisk", "create", "vm1", "--pool", "p", "--size", "64M")
        cluster.ok("host", "create", "h", "--iqn", INITIATOR)
        cluster.ok("zone", "add", "h", "vm1", "--lun", "0")
        token = (cluster.certs / "metrics-token").read_text().strip()
        assert (cluster.certs / "metrics-token").stat().st_mode & 0o777 == 0o600
        url = f"http://127.0.0.1:{port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(url, None)
        assert refused.value.code == 401
        before = scrape(url, token)
        load(cluster.iscsi_port, 0)
        after = scrape(url, token)
        check_io(before, after, "vm1")
        assert value(after, "san_gateway_lease_valid") == 1
        assert value(after, "san_gateway_registered_total") == 1
        assert after["san_fault_resolution_seconds_count"][(("state", "invalid"),)] >= 1
        controller = scrape(f"{cluster.api}/metrics", cluster.token)
        assert value(controller, "san_gateway_registrations_total", gateway="gw1") == 1
        assert value(controller, "san_gateway_lease_seconds", gateway="gw1") > 0
        assert "san_vdisk_commands_total" not in controller, "the controller serves no I/O: its gateways count it"
        dashboard = (Path(__file__).parent.parent / "docs" / "grafana" / "san-dashboard.json").read_text()
        used = set(re.findall(r"\bsan_[a-z_]+", dashboard)) - {"san_dashboard"}
        served = set(controller) | set(after)
        assert used and used <= served, f"the dashboard uses metrics nobody serves: {used - served}"
    finally:
        assert cluster.running, cluster.log_text()
        assert cluster.stop() == 0, cluster.log_text()


def test_san_top_shows_the_vdisk_being_written(server: SanServer) -> None:
    options = f"driver=iscsi,transport=tcp,portal=127.0.0.1:{server.iscsi_port},target={TARGET},lun=0,initiator-name={INITIATOR}"
    # far more writes than top's second takes: the writer is stopped once top is done
    bench = ["qemu-img", "bench", "-w", "-c", "100000000", "-s", "4096", "-S", "4096", "-d", "1", "--pattern=9"]
    writer = subprocess.Popen([*bench, "--image-opts", options], stdout=subprocess.DEVNULL)
    try:
        time.sleep(1)
        shown = server.ok("top", "--interval", "0.5", "--count", "2")
        assert writer.poll() is None, "the writer ended before top measured"
    finally:
        writer.kill()
        writer.wait(timeout=60)
    lines = [line.split() for line in shown.splitlines()]
    header = next(line for line in lines if line and line[0] == "VDISK")
    rows = [dict(zip(header, line, strict=True)) for line in lines if line and line[0] == "vm1"]
    assert len(rows) == 2, shown
    assert any(float(row["w/s"]) > 0 and float(row["w_ms"]) > 0 for row in rows), shown
