#!/usr/bin/env python3
"""iscsi-test-cu (ALL, suite by suite, --dataloss) against LIO + san; san's failures are run again against LIO + fileio
and then LIO + tcmu-runner; exits 1 if san fails a test that both pass (JSON report with every outcome)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import rtslib

SAN_DIR = Path(__file__).resolve().parents[2]
SAN = str(SAN_DIR / ".venv/bin/san")
TARGET = "iqn.2003-01.org.san:conformance"
INITIATORS = ("iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test", "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2")
PORTAL = ("127.0.0.1", 3260)
API = "http://127.0.0.1:8080"
DISK_SIZE = 256 << 20
RO_SIZE = 16 << 20


def suites() -> list[str]:
    listing = subprocess.run(["iscsi-test-cu", "--list"], capture_output=True, text=True, check=False)
    return re.findall(r"^ALL\.([A-Za-z0-9_]+)$", listing.stdout + listing.stderr, re.MULTILINE)


def outcomes(suite: str, output: str) -> dict[str, str]:
    """passed / FAILED / SKIPPED per test, from CUnit's verbose output (libiscsi's own "[FAILED] ..." log lines,
    printed for retried commands too, are not results: CUnit's "...FAILED" or a lone "FAILED" is)."""
    found: dict[str, str] = {}
    current = ""
    for line in output.splitlines():
        test = re.search(r"Test: (\S+) \.\.\.", line)
        if test:
            current = f"{suite}.{test.group(1)}"
            found[current] = "passed"
        if current and "[SKIPPED]" in line:
            found[current] = "SKIPPED"
        if current and re.search(r"(\.\.\.|^)FAILED\s*$", line):
            found[current] = "FAILED"
    summary = re.search(r"^\s+tests\s+\d+\s+\d+\s+\d+\s+(\d+)", output, re.MULTILINE)
    if summary is None or int(summary.group(1)) != sum(1 for v in found.values() if v == "FAILED"):
        found[f"{suite}.(run)"] = "FAILED"
    return found


def run_suites(label: str, names: list[str], log: Path) -> dict[str, str]:
    results: dict[str, str] = {}
    with log.open("a") as out:
        for suite in names:
            lun = 1 if suite == "ReadOnly" else 0
            url = f"iscsi://{PORTAL[0]}:{PORTAL[1]}/{TARGET}/{lun}"
            urls = [url, url] if suite == "MultipathIO" else [url]
            command = ["iscsi-test-cu", "--test", f"ALL.{suite}", "--dataloss", "-i", INITIATORS[0], "-I", INITIATORS[1]]
            started = time.monotonic()
            try:
                done = subprocess.run([*command, *urls], capture_output=True, text=True, timeout=300, check=False)
                output = done.stdout + done.stderr
            except subprocess.TimeoutExpired as exc:
                output = f"{exc}\n"
            out.write(f"==== {label} {suite} ({time.monotonic() - started:.1f} s)\n{output}\n")
            print(f"{label} {suite}: {time.monotonic() - started:.1f} s", flush=True)
            out.flush()
            results.update(outcomes(suite, output))
    return results


def san_target(data: Path, log: Path) -> subprocess.Popen[bytes]:
    serve = subprocess.Popen(
        [SAN, "serve", "--frontend", "lio", "--data", str(data), "--portal", f"{PORTAL[0]}:{PORTAL[1]}", "--iqn", TARGET],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    for _ in range(240):
        if subprocess.run([SAN, "--api", API, "pool", "list"], capture_output=True, check=False).returncode == 0:
            break
        if serve.poll() is not None:
            raise SystemExit("san serve exited: see serve.log")
        time.sleep(0.5)

    def san(*args: str) -> None:
        print("san", *args, flush=True)
        subprocess.run([SAN, "--api", API, *args], check=True, stdout=subprocess.DEVNULL, timeout=120)

    san("pool", "create", "p", "--size", "2G")
    san("vdisk", "create", "disk", "--pool", "p", "--size", f"{DISK_SIZE >> 20}M")
    san("vdisk", "create", "ro", "--pool", "p", "--size", f"{RO_SIZE >> 20}M")
    for index, iqn in enumerate(INITIATORS):
        san("host", "create", f"libiscsi{index}", "--iqn", iqn)
        san("zone", "add", f"libiscsi{index}", "disk", "--lun", "0")
        san("zone", "add", f"libiscsi{index}", "ro", "--lun", "1", "--read-only")
    return serve


def lio_target(disk: rtslib.StorageObject, ro: rtslib.StorageObject) -> None:
    """The layout san makes, for another backstore: LUN 0 read-write and LUN 1 read-only for both initiators."""
    target = rtslib.Target(rtslib.FabricModule("iscsi"), TARGET)
    tpg = rtslib.TPG(target, 1)
    tpg.set_attribute("generate_node_acls", "0")
    tpg.set_attribute("authentication", "0")
    rtslib.NetworkPortal(tpg, *PORTAL)
    lun0 = rtslib.LUN(tpg, 0, disk)
    lun1 = rtslib.LUN(tpg, 1, ro)
    for iqn in INITIATORS:
        acl = rtslib.NodeACL(tpg, iqn)
        rtslib.MappedLUN(acl, 0, lun0)
        rtslib.MappedLUN(acl, 1, lun1, write_protect=True)
    tpg.enable = True


def fileio_target(pool_file: Path, ro_file: Path) -> None:
    """LIO's own fileio backstore: LUN 0 on san's pool file, LUN 1 beside it."""
    with ro_file.open("wb") as f:
        f.truncate(RO_SIZE)
    disk = rtslib.FileIOStorageObject("fileio-disk", str(pool_file), DISK_SIZE, write_back=True)
    ro = rtslib.FileIOStorageObject("fileio-ro", str(ro_file), RO_SIZE, write_back=True)
    lio_target(disk, ro)


def tcmu_runner_target(work: Path) -> subprocess.Popen[bytes]:
    """tcmu-runner (Debian's build has no plain file handler: its qcow handler, on qcow2 images) with the same layout."""
    os.makedirs("/run/dbus", exist_ok=True)
    if not Path("/run/dbus/system_bus_socket").exists():
        subprocess.run(["dbus-daemon", "--system", "--fork"], check=True)
    runner = subprocess.Popen(["tcmu-runner", "-l", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    images = {}
    for name, size in (("tr-disk", DISK_SIZE), ("tr-ro", RO_SIZE)):
        images[name] = work / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images[name]), str(size)], check=True)
    disk = rtslib.UserBackedStorageObject("tr-disk", config=f"qcow/{images['tr-disk']}", size=DISK_SIZE)
    ro = rtslib.UserBackedStorageObject("tr-ro", config=f"qcow/{images['tr-ro']}", size=RO_SIZE)
    lio_target(disk, ro)
    return runner


def failed_suites(results: dict[str, str]) -> list[str]:
    return sorted({t.split(".")[0] for t, outcome in results.items() if outcome == "FAILED"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/var/tmp/conformance", help="data directory")
    parser.add_argument("--report", default="conformance.json", help="where the JSON report goes")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = Path(args.report).with_suffix(".log")
    log.unlink(missing_ok=True)
    for sub in ("pr", "alua"):
        os.makedirs(f"/etc/target/{sub}", exist_ok=True)

    serve = san_target(work / "data", Path(args.report).with_suffix(".serve.log"))
    try:
        san_results = run_suites("san", suites(), log)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)
    leftovers = [so.name for so in rtslib.RTSRoot().storage_objects] + [t.wwn for t in rtslib.RTSRoot().targets]
    if serve.returncode != 0 or leftovers:
        print(f"san did not stop cleanly: exit {serve.returncode}, LIO objects left: {leftovers}")
        return 1

    retry = failed_suites(san_results)
    fileio_target(work / "data/pools/p.img", work / "ro.img")
    try:
        fileio_results = run_suites("fileio", retry, log)
    finally:
        rtslib.RTSRoot().clear_existing(confirm=True)

    worse = sorted(t for t, outcome in san_results.items() if outcome == "FAILED" and fileio_results.get(t) == "passed")
    runner_results: dict[str, str] = {}
    if worse:
        runner = tcmu_runner_target(work)
        try:
            runner_results = run_suites("tcmu-runner", failed_suites(dict.fromkeys(worse, "FAILED")), log)
        finally:
            rtslib.RTSRoot().clear_existing(confirm=True)
            runner.terminate()
            runner.wait(timeout=60)
    every_tcmu = sorted(t for t in worse if runner_results.get(t) == "FAILED")
    unexplained = sorted(set(worse) - set(every_tcmu))
    report = {
        "san": san_results,
        "fileio": fileio_results,
        "tcmu_runner": runner_results,
        "san_fails_fileio_passes": worse,
        "tcmu_runner_fails_too": every_tcmu,
        "unexplained": unexplained,
    }
    Path(args.report).write_text(json.dumps(report, indent=1, sort_keys=True))
    for name, results in (("LIO + san", san_results), ("LIO + fileio", fileio_results), ("tcmu-runner", runner_results)):
        counts = {k: sum(1 for v in results.values() if v == k) for k in ("passed", "FAILED", "SKIPPED")}
        failed = sorted(t for t, outcome in results.items() if outcome == "FAILED")
        print(f"{name}: {len(results)} tests, {counts['passed']} passed, {counts['FAILED']} failed, {counts['SKIPPED']} skipped")
        print(f"  failed: {', '.join(failed) or 'none'}")
    print(f"failed with san, passed with fileio: {worse or 'none'}")
    print(f"  of which tcmu-runner fails too (a TCMU limit): {every_tcmu or 'none'}")
    print(f"  unexplained: {unexplained or 'none'}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
