"""Benchmark: what a snapshot costs the writes after it, and what taking one costs. One `san serve` on loopback.

Each round makes two thin 256 MiB vdisks filled with the same random data (so every segment is mapped), snapshots
one of them, and runs the same 4 KiB write load (qemu-img bench, queue depth 32, each write 1 MiB + 4 KiB after the
last, wrapping around the vdisk: every segment is written over and over, 4 KiB at a time, at ever other offsets)
against each, the snapshotted one first in odd rounds and second in even ones. On the snapshotted vdisk every write
lands in a segment the snapshot shares: the first into each copies on write, the rest go where it put them.

- cow_write_ratio: the median over the rounds of writes/s on the snapshotted vdisk over writes/s on the other;
- cow_bytes_per_write: bytes written to the container files per write into the snapshotted vdisk, from /metrics:
  what hosts wrote (san_vdisk_bytes) plus what copy on write copied besides (san_copy_on_write_copied_bytes);
- create_ms: milliseconds for POST /vdisks/big/snapshots (the API's answer, the snapshot recorded and every agent's
  writes fenced) on a vdisk whose table maps 1,048,576 segments (1 TiB in 1 MiB segments, made in the store without
  writing data), the median of 5.

The last line is `snapshot cow_write_ratio=<x> cow_bytes_per_write=<y> create_ms=<z>` (goals >= 0.8, <= 8192, <= 50)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from iscsi_vs_tgt import INITIATOR, SAN_IQN, random_image, require, run, san_bin, san_target
from prometheus_client.parser import text_string_to_metric_families

SIZE = 256 << 20
STEP = (1 << 20) + 4096
BIG_SEGMENTS = 1 << 20


def request(api: str, token: str, method: str, path: str, body: object = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(api + path, data, headers, method=method), timeout=60) as answer:
        return bytes(answer.read())


def counters(api: str, token: str, vdisk: str) -> dict[str, float]:
    """The vdisk's write commands and bytes, and the bytes copy on write copied, from /metrics."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(request(api, token, "GET", "/metrics").decode()):
        for sample in family.samples:
            mine = sample.labels.get("vdisk") == vdisk and sample.labels.get("op") == "write"
            if mine and sample.name in ("san_vdisk_commands_total", "san_vdisk_bytes_total"):
                found[sample.name] = sample.value
            if sample.name == "san_copy_on_write_copied_bytes_total":
                found["copied"] = sample.value
    return found


def image_options(portal: int, lun: int) -> str:
    return f"driver=iscsi,transport=tcp,portal=127.0.0.1:{portal},target={SAN_IQN},lun={lun},initiator-name={INITIATOR}"


def write_load(portal: int, lun: int, count: int) -> float:
    """Writes per second qemu-img bench reports for `count` 4 KiB writes STEP bytes apart."""
    options = image_options(portal, lun)
    bench = ["qemu-img", "bench", "-w", "--pattern=90", "-c", str(count), "-s", "4096", "-S", str(STEP), "-d", "32"]
    output = run(*bench, "--image-opts", options)
    for line in output.splitlines():
        if line.startswith("Run completed in"):
            return count / float(line.split()[3])
    raise SystemExit(f"no result from qemu-img bench: {output[-500:]}")


@contextlib.contextmanager
def server(work: Path, *extra: str) -> Iterator[tuple[str, int, str]]:
    with san_target(work, "--metrics", "on", *extra, name="san") as (api, portal):
        token = (work / "san" / "api-token").read_text().strip()
        yield api, portal, token


def cow_rounds(work: Path, rounds: int, count: int) -> tuple[float, float]:
    source = work / "random.img"
    random_image(source, SIZE)
    ratios: list[float] = []
    per_write: list[float] = []
    with server(work) as (api, portal, token):
        san = [san_bin(), "--api", api]
        run(*san, "pool", "create", "p", "--size", str(4 * rounds * SIZE + (1 << 30)), "--segment-size", "1M")
        run(*san, "host", "create", "bench", "--iqn", INITIATOR)
        for i in range(rounds):
            luns = {}
            for kind in ("plain", "shared"):
                name = f"{kind}{i}"
                run(*san, "vdisk", "create", name, "--pool", "p", "--size", str(SIZE))
                lun = luns[kind] = 2 * i + (kind == "shared")
                run(*san, "zone", "add", "bench", name, "--lun", str(lun))
                run("qemu-img", "convert", "-n", "-f", "raw", str(source), "--target-image-opts", image_options(portal, lun))
            os.sync()  # the fill written back before either is measured: neither run waits for the other's writeback
            run(*san, "snapshot", "create", f"shared{i}", "before")
            before = counters(api, token, f"shared{i}")
            order = ("shared", "plain") if i % 2 == 0 else ("plain", "shared")
            rates = {kind: write_load(portal, luns[kind], count) for kind in order}
            after = counters(api, token, f"shared{i}")
            writes = after["san_vdisk_commands_total"] - before.get("san_vdisk_commands_total", 0)
            written = after["san_vdisk_bytes_total"] - before.get("san_vdisk_bytes_total", 0)
            copied = after.get("copied", 0) - before.get("copied", 0)
            ratios.append(rates["shared"] / rates["plain"])
            per_write.append((written + copied) / writes)
            print(
                f"round {i + 1}: {rates['shared']:.0f} writes/s into the snapshotted vdisk, {rates['plain']:.0f} into"
                f" the other (ratio {ratios[-1]:.3f}); {writes:.0f} writes, {written:.0f} bytes written,"
                f" {copied:.0f} copied: {per_write[-1]:.0f} bytes per write",
                flush=True,
            )
    return statistics.median(ratios), max(per_write)


def create_times(work: Path, tries: int) -> float:
    """Milliseconds per snapshot of a vdisk with BIG_SEGMENTS mapped segments (mapped straight in the store)."""
    data = work / "big"
    data.mkdir()
    backing = work / "big.img"  # sparse: more than the file system holds, and never written beyond its label
    with backing.open("wb") as f:
        f.truncate((BIG_SEGMENTS + 64) << 20)
    with server(data, "--allow-path", str(work)) as (api, _, _):
        san = [san_bin(), "--api", api]
        run(*san, "pool", "create", "big", "--path", str(backing), "--existing", "--segment-size", "1M")
        run(*san, "vdisk", "create", "big", "--pool", "big", "--size", str(BIG_SEGMENTS << 20))
    with sqlite3.connect(data / "san" / "san.db") as db:
        vdisk = db.execute("SELECT id FROM vdisk WHERE name = 'big'").fetchone()[0]
        container = db.execute("SELECT id FROM container").fetchone()[0]
        db.executemany(
            "INSERT INTO mapping (vdisk_id, vseg, container_id, pseg, state) VALUES (?, ?, ?, ?, 0)",
            ((vdisk, vseg, container, vseg + 1) for vseg in range(BIG_SEGMENTS)),
        )
        db.executemany("INSERT INTO segment VALUES (?, ?, 1)", ((container, vseg + 1) for vseg in range(BIG_SEGMENTS)))
    times: list[float] = []
    with server(data, "--allow-path", str(work)) as (api, _, token):
        mapped = json.loads(request(api, token, "GET", "/vdisks/big"))["allocated_bytes"]
        if mapped != BIG_SEGMENTS << 20:
            raise SystemExit(f"the big vdisk maps {mapped} bytes, not {BIG_SEGMENTS << 20}")
        for i in range(tries):
            began = time.perf_counter()
            request(api, token, "POST", "/vdisks/big/snapshots", {"name": f"s{i}"})
            times.append((time.perf_counter() - began) * 1000)
        print("snapshot create of 1,048,576 mapped segments: " + ", ".join(f"{t:.1f}" for t in times) + " ms", flush=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of vdisks measured")
    parser.add_argument("--writes", type=int, default=40000, help="4 KiB writes per run")
    args = parser.parse_args()
    require(("qemu-img",), "qemu-utils qemu-block-extra")
    with tempfile.TemporaryDirectory(prefix="san-bench-") as tmp:
        ratio, per_write = cow_rounds(Path(tmp), args.rounds, args.writes)
        create_ms = create_times(Path(tmp), 5)
    print(f"snapshot cow_write_ratio={ratio:.3f} cow_bytes_per_write={per_write:.0f} create_ms={create_ms:.1f}")


if __name__ == "__main__":
    main()
