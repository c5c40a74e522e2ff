#!/usr/bin/env python3
"""LIO + san's TCMU handler against LIO + fileio in a QEMU VM: fio 4 KiB random reads and writes (QD 32) on the kernel
initiator's disk, same time, same file; last line `lio_vs_fileio randread4k_ratio=<x> randwrite4k_ratio=<y>`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAN = str(ROOT / ".venv/bin/san")
TARGET = "iqn.2003-01.org.san:bench"
PORTAL = "127.0.0.1:3260"
API = "http://127.0.0.1:8080"
SIZE = 1 << 30
WORK = Path("/var/tmp/lio-bench")


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=check).stdout


def initiator_name() -> str:
    for line in Path("/etc/iscsi/initiatorname.iscsi").read_text().splitlines():
        if line.startswith("InitiatorName="):
            return line.split("=", 1)[1].strip()
    raise SystemExit("no InitiatorName in /etc/iscsi/initiatorname.iscsi")


def login() -> str:
    """Log in with open-iscsi; the attached disk's name."""
    sh("iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", PORTAL)
    sh("iscsiadm", "-m", "node", "-T", TARGET, "-p", PORTAL, "--login")
    for _ in range(100):
        for line in sh("iscsiadm", "-m", "session", "-P", "3", check=False).splitlines():
            if "Attached scsi disk" in line:
                return line.split()[3]
        time.sleep(0.2)
    raise SystemExit("no disk attached after login")


def logout() -> None:
    sh("iscsiadm", "-m", "node", "-T", TARGET, "--logout")
    sh("iscsiadm", "-m", "node", "-o", "delete")


def fio(disk: str, rw: str, seconds: int) -> float:
    output = sh(
        "fio", "--name", rw, "--filename", f"/dev/{disk}", "--direct=1", "--ioengine=libaio", "--iodepth=32",
        f"--rw={rw}", "--bs=4k", f"--runtime={seconds}", "--time_based", "--group_reporting",
        "--output-format=json", f"--size={SIZE}",
    )  # fmt: skip
    job = json.loads(output[output.index("{") :])["jobs"][0]
    return float(job["read" if "read" in rw else "write"]["iops"])


def measure(label: str, seconds: int) -> dict[str, float]:
    disk = login()
    try:
        fio(disk, "randwrite", 3)  # warm-up: every block written once from this side too
        result = {rw: fio(disk, rw, seconds) for rw in ("randread", "randwrite")}
    finally:
        logout()
    print(f"{label}: randread4k {result['randread']:.0f} IOPS, randwrite4k {result['randwrite']:.0f} IOPS", flush=True)
    return result


def guest(seconds: int, report: Path) -> int:
    """Inside the VM: san first (a thick vdisk, so every block is mapped), then fileio on san's pool file."""
    import rtslib

    os.makedirs("/etc/target", exist_ok=True)
    os.makedirs("/run/lock/iscsi", exist_ok=True)
    if subprocess.run(["pgrep", "-x", "iscsid"], capture_output=True, check=False).returncode:
        sh("iscsid")
    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / "data"
    with (WORK / "serve.log").open("w") as log:
        serve = subprocess.Popen(
            [SAN, "serve", "--frontend", "lio", "--data", str(data), "--portal", PORTAL, "--iqn", TARGET],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    for _ in range(240):
        if subprocess.run([SAN, "--api", API, "pool", "list"], capture_output=True, check=False).returncode == 0:
            break
        time.sleep(0.5)
    for args in (
        ("pool", "create", "p", "--size", f"{2 * SIZE >> 20}M"),
        ("vdisk", "create", "bench", "--pool", "p", "--size", f"{SIZE >> 20}M", "--thick"),
        ("host", "create", "me", "--iqn", initiator_name()),
        ("zone", "add", "me", "bench", "--lun", "0"),
    ):
        sh(SAN, "--api", API, *args)
    for _ in range(600):
        shown = json.loads(sh(SAN, "--api", API, "vdisk", "show", "bench", "--json"))
        if shown.get("state") == "ready":
            break
        time.sleep(0.5)
    try:
        san = measure("LIO + san", seconds)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)

    pool_file = data / "pools" / "p.img"
    so = rtslib.FileIOStorageObject("bench", str(pool_file), SIZE, write_back=True)
    target = rtslib.Target(rtslib.FabricModule("iscsi"), TARGET)
    tpg = rtslib.TPG(target, 1)
    tpg.set_attribute("generate_node_acls", "0")
    tpg.set_attribute("authentication", "0")
    host, port = PORTAL.rsplit(":", 1)
    rtslib.NetworkPortal(tpg, host, int(port))
    rtslib.MappedLUN(rtslib.NodeACL(tpg, initiator_name()), 0, rtslib.LUN(tpg, 0, so))
    tpg.enable = True
    try:
        fileio = measure("LIO + fileio", seconds)
    finally:
        rtslib.RTSRoot().clear_existing(confirm=True)
    report.write_text(json.dumps({"san": san, "fileio": fileio}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="seconds per fio run (default 20)")
    parser.add_argument("--guest", metavar="REPORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.guest:
        return guest(args.seconds, Path(args.guest))
    out = Path(os.environ.get("BENCH_OUT", "/var/tmp/lio-vs-fileio"))
    done = subprocess.run(
        [sys.executable, str(ROOT / "vagrant/qemu_vm.py"), "--out", str(out), "--timeout", "1500", "--",
         str(ROOT / ".venv/bin/python"), str(Path(__file__).resolve()), "--seconds", str(args.seconds),
         "--guest", "/vmout/bench.json"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        print("lio_vs_fileio failed: see the log above")
        return 1
    result = json.loads((out / "bench.json").read_text())
    san, fileio = result["san"], result["fileio"]
    read_ratio = san["randread"] / fileio["randread"]
    write_ratio = san["randwrite"] / fileio["randwrite"]
    print(f"lio_vs_fileio randread4k_ratio={read_ratio:.2f} randwrite4k_ratio={write_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
