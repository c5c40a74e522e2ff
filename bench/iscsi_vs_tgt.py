"""Benchmark: the built-in iSCSI target against tgtd, side by side on loopback, on the same kind of backing file.

Both serve a 1 GiB disk filled with the same random data (san: a thin vdisk in a pool on a sparse file; tgtd: a file
LUN); iscsi-perf runs the same load against each for the same time, alternating, best of --rounds. Then
`qemu-img bench -w` times 4 KiB writes on a fresh thin vdisk (each write in a new segment) against the same writes
once every segment is allocated, best of --rounds fresh vdisks. The last line is
`iscsi_vs_tgt randread4k_ratio=<x> seqread128k_ratio=<y>` (goal: x >= 1.0, y >= 0.9; the write ratio, printed
before it, >= 0.9)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SAN_IQN = "iqn.2003-01.org.san:bench"
TGT_IQN = "iqn.2001-04.org.tgt:bench"
INITIATOR = "iqn.2024-01.org.example:bench"
SIZE = 1 << 30
WRITE_SEGMENT = 64 << 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run(*args: str, timeout: float = 600) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return result.stdout + result.stderr


def require(tools: tuple[str, ...], packages: str) -> None:
    """Exit with the apt-get line when a tool is missing."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing {missing}: apt-get install {packages}")


def random_image(path: Path, size: int) -> None:
    """A file of size bytes (a multiple of 16 MiB) of random data."""
    with path.open("wb") as out:
        for _ in range(size >> 24):
            out.write(os.urandom(1 << 24))


def wait_api(url: str, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 30) -> None:
    """Return once url answers; exit with the log if proc ends or the time runs out first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/openapi.json", timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{what} did not start: {log.read_text()}") from None
            time.sleep(0.1)


def san_bin() -> str:
    script = Path(sys.executable).with_name("san")
    return str(script) if script.exists() else "san"


@contextlib.contextmanager
def san_target(work: Path, *extra: str, name: str = "san", cpus: str = "") -> Iterator[tuple[str, int]]:
    """`san serve` (data in work/name, with extra options, on the given CPUs if any): its API URL and its portal."""
    api, portal = free_port(), free_port()
    log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed below
    command = ["taskset", "-c", cpus] if cpus else []
    command += [san_bin(), "serve", "--data", str(work / name), "--api", f"127.0.0.1:{api}"]
    command += ["--portal", f"127.0.0.1:{portal}", "--iqn", SAN_IQN, "--log-level", "warning", *extra]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_api(f"http://127.0.0.1:{api}", proc, work / f"{name}.log", "san serve")
        yield f"http://127.0.0.1:{api}", portal
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def tgt_target(work: Path, backing: Path) -> Iterator[int]:
    portal, control = free_port(), free_port() % 4000 + 1000
    proc = subprocess.Popen(
        ["tgtd", "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{portal}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        admin = ["tgtadm", "-C", str(control), "--lld", "iscsi"]
        for _ in range(50):
            if subprocess.run([*admin, "--op", "show", "--mode", "target"], capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.1)
        run(*admin, "--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN)
        run(*admin, "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(backing))
        run(*admin, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        yield portal
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def perf(url: str, seconds: int, blocks: int, random_io: bool) -> float:
    """IOPS iscsi-perf reports as its average over the run."""
    args = ["iscsi-perf", "-i", INITIATOR, "-t", str(seconds), "-b", str(blocks), "-m", "32"]
    output = run(*args, *(["-r"] if random_io else []), url, timeout=seconds + 60)
    found = re.findall(r"iops average (\d+)", output.replace("\r", "\n"))
    if not found:
        raise SystemExit(f"no result from iscsi-perf: {output[-500:]}")
    return float(found[-1])


def qemu_bench(url: str, count: int, step: int) -> float:
    """Writes per second qemu-img bench reports for 4 KiB writes `step` bytes apart."""
    options = f"driver=iscsi,transport=tcp,portal={url},target={SAN_IQN},lun=0,initiator-name={INITIATOR}"
    # A non-zero pattern: writes of zeros to unmapped space allocate nothing (they only fault), which is not this test.
    bench = ["qemu-img", "bench", "-w", "--pattern=165", "-c", str(count), "-s", "4096", "-S", str(step), "-d", "32"]
    output = run(*bench, "--image-opts", options)
    found = re.search(r"Run completed in ([0-9.]+) seconds", output)
    if not found:
        raise SystemExit(f"no result from qemu-img bench: {output[-500:]}")
    return count / float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=8, help="length of each iscsi-perf run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per target; the best counts")
    args = parser.parse_args()
    require(("tgtd", "tgtadm", "iscsi-perf", "qemu-img"), "tgt libiscsi-bin qemu-utils qemu-block-extra")
    with tempfile.TemporaryDirectory(prefix="san-bench-") as tmp:
        work = Path(tmp)
        source = work / "random.img"
        random_image(source, SIZE)
        backing = work / "tgt.img"
        shutil.copyfile(source, backing)
        with san_target(work) as (api, san_portal), tgt_target(work, backing) as tgt_portal:
            san = [san_bin(), "--api", api]
            run(*san, "pool", "create", "p", "--size", "4G")
            run(*san, "pool", "create", "w", "--size", "2G", "--segment-size", str(WRITE_SEGMENT))
            run(*san, "vdisk", "create", "disk", "--pool", "p", "--size", str(SIZE))
            run(*san, "host", "create", "bench", "--iqn", INITIATOR)
            run(*san, "zone", "add", "bench", "disk", "--lun", "0")
            target = f"driver=iscsi,transport=tcp,portal=127.0.0.1:{san_portal},target={SAN_IQN},lun=0,initiator-name={INITIATOR}"
            run("qemu-img", "convert", "-n", "-f", "raw", str(source), "--target-image-opts", target)
            san_url = f"iscsi://127.0.0.1:{san_portal}/{SAN_IQN}/0"
            tgt_url = f"iscsi://127.0.0.1:{tgt_portal}/{TGT_IQN}/1"
            results: dict[str, dict[str, float]] = {"san": {}, "tgt": {}}
            for name, blocks, random_io in (("randread4k", 8, True), ("seqread128k", 256, False)):
                for _ in range(args.rounds):
                    for target_name, url in (("san", san_url), ("tgt", tgt_url)):
                        iops = perf(url, args.seconds, blocks, random_io)
                        results[target_name][name] = max(results[target_name].get(name, 0.0), iops)
                print(f"{name}: san {results['san'][name]:.0f} IOPS, tgtd {results['tgt'][name]:.0f} IOPS")
            run(*san, "zone", "remove", "bench", "disk")
            count = (1 << 30) // WRITE_SEGMENT
            fresh = allocated = 0.0
            for index in range(args.rounds):
                name = f"fresh{index}"
                run(*san, "vdisk", "create", name, "--pool", "w", "--size", "1G")
                run(*san, "zone", "add", "bench", name, "--lun", "0")
                fresh = max(fresh, qemu_bench(f"127.0.0.1:{san_portal}", count, WRITE_SEGMENT))
                allocated = max(allocated, qemu_bench(f"127.0.0.1:{san_portal}", count, WRITE_SEGMENT))
                run(*san, "zone", "remove", "bench", name)
                run(*san, "vdisk", "delete", name)
            print(
                f"4k writes, each in a new {WRITE_SEGMENT >> 10} KiB segment: fresh thin {fresh:.0f}/s,"
                f" allocated {allocated:.0f}/s, write_alloc_ratio={fresh / allocated:.2f}"
            )
        randread = results["san"]["randread4k"] / results["tgt"]["randread4k"]
        seqread = results["san"]["seqread128k"] / results["tgt"]["seqread128k"]
        print(f"iscsi_vs_tgt randread4k_ratio={randread:.2f} seqread128k_ratio={seqread:.2f}")


if __name__ == "__main__":
    main()
