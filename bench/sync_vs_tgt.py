"""Benchmark: 4 KiB writes with a SYNCHRONIZE CACHE after every 8, from 8 sessions at once, san against tgtd.

Each session is its own qemu-img bench process with its own initiator name, writing its own 64 MiB region of one
disk (san: a thick vdisk; tgtd: a fully allocated file LUN), queue depth 1, a flush after every 8 writes. Group
commit lets concurrent flushes share one fdatasync and one metadata commit. Alternating runs, best of --rounds. The
last line is `sync_vs_tgt sync_ratio=<z>` (san's writes per second over tgtd's; goal >= 1.3)."""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

from iscsi_vs_tgt import SAN_IQN, TGT_IQN, require, run, san_bin, san_target, tgt_target

SESSIONS = 8
REGION = 64 << 20
SIZE = SESSIONS * REGION


def initiator(index: int) -> str:
    return f"iqn.2024-01.org.example:sync{index}"


def sessions(portal: int, target: str, lun: int, count: int) -> float:
    """Writes per second of SESSIONS concurrent qemu-img bench runs (each: count 4 KiB writes, flush every 8)."""
    procs = []
    started = time.monotonic()
    for index in range(SESSIONS):
        options = (
            f"driver=iscsi,transport=tcp,portal=127.0.0.1:{portal},target={target},lun={lun},initiator-name={initiator(index)}"
        )
        bench = ["qemu-img", "bench", "-w", "--pattern=165", "-c", str(count), "-s", "4096", "-S", "4096", "-d", "1"]
        bench += ["--flush-interval=8", "-o", str(index * REGION), "--image-opts", options]
        procs.append(subprocess.Popen(bench, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    elapsed = time.monotonic() - started
    for proc, output in zip(procs, outputs, strict=True):
        if proc.returncode != 0 or not re.search(r"Run completed in ([0-9.]+) seconds", output):
            raise SystemExit(f"qemu-img bench failed ({proc.returncode}): {output[-500:]}")
    return SESSIONS * count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="writes per session and run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per target; the best counts")
    args = parser.parse_args()
    require(("tgtd", "tgtadm", "qemu-img"), "tgt qemu-utils qemu-block-extra")
    with tempfile.TemporaryDirectory(prefix="san-bench-") as tmp:
        work = Path(tmp)
        backing = work / "tgt.img"
        with backing.open("wb") as out:
            out.truncate(SIZE)
        run("fallocate", "-l", str(SIZE), str(backing))
        with san_target(work) as (api, san_portal), tgt_target(work, backing) as tgt_portal:
            san = [san_bin(), "--api", api]
            run(*san, "pool", "create", "p", "--size", str(SIZE + (64 << 20)))
            run(*san, "vdisk", "create", "disk", "--pool", "p", "--size", str(SIZE), "--thick")
            for index in range(SESSIONS):
                run(*san, "host", "create", f"sync{index}", "--iqn", initiator(index))
                run(*san, "zone", "add", f"sync{index}", "disk", "--lun", "0")
            best = {"san": 0.0, "tgt": 0.0}
            for _ in range(args.rounds):
                best["san"] = max(best["san"], sessions(san_portal, SAN_IQN, 0, args.count))
                best["tgt"] = max(best["tgt"], sessions(tgt_portal, TGT_IQN, 1, args.count))
            print(f"4k writes + flush every 8, {SESSIONS} sessions: san {best['san']:.0f}/s, tgtd {best['tgt']:.0f}/s")
        print(f"sync_vs_tgt sync_ratio={best['san'] / best['tgt']:.2f}")


if __name__ == "__main__":
    main()
