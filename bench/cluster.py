"""Benchmark: a gateway with its controller in another process (over mutual TLS) against `san serve`, and against tgtd.

Three loads, each one run per target, on 127.0.0.1: 4 KiB random reads (iscsi-perf, queue depth 32) of a 1 GiB
thin vdisk filled with random data; 4 KiB first writes into a fresh thin vdisk, each in a new 64 KiB segment
(qemu-img bench, depth 32); 4 KiB writes with a SYNCHRONIZE CACHE after every 8 from 8 sessions at once, each with
its own initiator name, through the gateway and through tgtd (a file LUN of the same size, fully allocated). The
last line is `cluster randread4k_ratio=<x> firstwrite_ratio=<y> sync_ratio=<z>`: gateway over `san serve` for the
first two (goals >= 0.95 and >= 0.8), gateway over tgtd for the third (goal >= 1.3)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from iscsi_vs_tgt import (
    INITIATOR,
    SAN_IQN,
    TGT_IQN,
    free_port,
    perf,
    random_image,
    require,
    run,
    san_bin,
    san_target,
    tgt_target,
    wait_api,
)
from sync_vs_tgt import SESSIONS, SIZE, initiator, sessions

READ_SIZE = 1 << 30
WRITE_SEGMENT = 64 << 10


@contextlib.contextmanager
def cluster_target(work: Path) -> Iterator[tuple[str, int]]:
    """`san controller` and one `san gateway` as two processes; the controller's API URL and the gateway's portal."""
    certs = work / "cluster"
    run(san_bin(), "cluster", "init", str(certs), "--nodes", "controller,gw1")
    api, listen, portal = free_port(), free_port(), free_port()
    logs = [open(work / "controller.log", "w"), open(work / "gateway.log", "w")]  # noqa: SIM115 - closed below
    controller = [san_bin(), "controller", "--data", str(work / "ctl"), "--listen", f"127.0.0.1:{listen}"]
    controller += ["--cluster", str(certs), "--api", f"127.0.0.1:{api}", "--log-level", "warning"]
    gateway = [san_bin(), "gateway", "--name", "gw1", "--controller", f"127.0.0.1:{listen}", "--cluster", str(certs)]
    gateway += ["--portal", f"127.0.0.1:{portal}", "--iqn", SAN_IQN, "--log-level", "info"]
    gateway += ["--storage", str(work / "ctl" / "pools")]
    procs = [subprocess.Popen(controller, stdout=logs[0], stderr=subprocess.STDOUT)]
    try:
        wait_api(f"http://127.0.0.1:{api}", procs[0], work / "controller.log", "san controller")
        deadline = time.monotonic() + 30
        procs.append(subprocess.Popen(gateway, stdout=logs[1], stderr=subprocess.STDOUT))
        while "registered with the controller" not in (work / "gateway.log").read_text():
            if time.monotonic() > deadline or procs[1].poll() is not None:
                raise SystemExit(f"san gateway did not register: {(work / 'gateway.log').read_text()}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{api}", portal
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


def first_writes(portal: int, count: int) -> float:
    """4 KiB writes per second into a fresh thin vdisk, one per new 64 KiB segment (qemu-img bench, depth 32)."""
    options = f"driver=iscsi,transport=tcp,portal=127.0.0.1:{portal},target={SAN_IQN},lun=0,initiator-name={INITIATOR}"
    bench = ["qemu-img", "bench", "-w", "--pattern=165", "-c", str(count), "-s", "4096", "-S", str(WRITE_SEGMENT)]
    output = run(*bench, "-d", "32", "--image-opts", options)
    seconds = float(output.split("Run completed in ")[1].split()[0])
    return count / seconds


def prepare(api: str, portal: int, source: Path) -> None:
    """The read disk (filled from source), a fresh thin vdisk for first writes, the sync disk with its 8 hosts."""
    san = [san_bin(), "--api", api]
    run(*san, "pool", "create", "p", "--size", "4G")
    run(*san, "pool", "create", "w", "--size", "2G", "--segment-size", str(WRITE_SEGMENT))
    run(*san, "vdisk", "create", "disk", "--pool", "p", "--size", str(READ_SIZE))
    run(*san, "vdisk", "create", "fresh", "--pool", "w", "--size", "1G")
    run(*san, "vdisk", "create", "sync", "--pool", "p", "--size", str(SIZE), "--thick")
    run(*san, "host", "create", "bench", "--iqn", INITIATOR)
    run(*san, "zone", "add", "bench", "disk", "--lun", "0")
    for index in range(SESSIONS):
        run(*san, "host", "create", f"sync{index}", "--iqn", initiator(index))
        run(*san, "zone", "add", f"sync{index}", "sync", "--lun", "0")
    target = f"driver=iscsi,transport=tcp,portal=127.0.0.1:{portal},target={SAN_IQN},lun=0,initiator-name={INITIATOR}"
    run("qemu-img", "convert", "-n", "-f", "raw", str(source), "--target-image-opts", target)
    run(*san, "zone", "remove", "bench", "disk")
    run(*san, "zone", "add", "bench", "fresh", "--lun", "0")


def measure(api: str, portal: int, source: Path, seconds: int, count: int) -> dict[str, float]:
    prepare(api, portal, source)
    os.sync()  # the 1 GiB just written is on disk before either target is timed: no writeback under the first writes
    san = [san_bin(), "--api", api]
    found = {"firstwrite": first_writes(portal, count)}
    run(*san, "zone", "remove", "bench", "fresh")
    run(*san, "zone", "add", "bench", "disk", "--lun", "0")
    found["randread"] = perf(f"iscsi://127.0.0.1:{portal}/{SAN_IQN}/0", seconds, 8, True)
    found["sync"] = sessions(portal, SAN_IQN, 0, count // SESSIONS)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=8, help="length of the random-read run")
    parser.add_argument("--count", type=int, default=8000, help="first writes, and sync writes in all (8 sessions)")
    args = parser.parse_args()
    require(("tgtd", "tgtadm", "iscsi-perf", "qemu-img"), "tgt libiscsi-bin qemu-utils qemu-block-extra")
    with tempfile.TemporaryDirectory(prefix="san-bench-") as tmp:
        work = Path(tmp)
        source = work / "random.img"
        random_image(source, READ_SIZE)
        (work / "serve").mkdir()
        (work / "gw").mkdir()
        with san_target(work / "serve") as (api, portal):
            serve = measure(api, portal, source, args.seconds, args.count)
        with cluster_target(work / "gw") as (api, portal):
            gateway = measure(api, portal, source, args.seconds, args.count)
        backing = work / "tgt.img"
        run("fallocate", "-l", str(SIZE), str(backing))
        with tgt_target(work, backing) as tgt_portal:
            tgt = sessions(tgt_portal, TGT_IQN, 1, args.count // SESSIONS)
        print(f"4k random reads: gateway {gateway['randread']:.0f} IOPS, san serve {serve['randread']:.0f} IOPS")
        print(f"4k first writes: gateway {gateway['firstwrite']:.0f}/s, san serve {serve['firstwrite']:.0f}/s")
        print(
            f"4k writes + flush every 8, {SESSIONS} sessions: gateway {gateway['sync']:.0f}/s,"
            f" san serve {serve['sync']:.0f}/s, tgtd {tgt:.0f}/s"
        )
        print(
            f"cluster randread4k_ratio={gateway['randread'] / serve['randread']:.2f}"
            f" firstwrite_ratio={gateway['firstwrite'] / serve['firstwrite']:.2f} sync_ratio={gateway['sync'] / tgt:.2f}"
        )


if __name__ == "__main__":
    main()
