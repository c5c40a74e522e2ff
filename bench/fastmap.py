"""Benchmark: cost of one map-table translation from Cython, and the speed-up over the Python reference.

Prints `fastmap ns_per_lookup=<x> python_ratio=<y>` as its last line (goal: x <= 50, y >= 20)."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from array import array
from pathlib import Path

import pyximport

import san
from san._fastmap import MapTable
from san.agent.refmap import RefMapTable

TIB = 1 << 40
MIB = 1 << 20
BLOCK = 512


def build(table: MapTable | RefMapTable, nsegments: int) -> None:
    """Map every segment, thick-style, to its own physical segment in container 1."""
    chunk = 1 << 16
    for start in range(0, nsegments, chunk):
        table.set_entries(start, [(1, s, 0) for s in range(start, min(start + chunk, nsegments))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lookups", type=int, default=4_000_000, help="translations timed in the Cython loop")
    parser.add_argument("--python-lookups", type=int, default=200_000, help="translations timed in Python")
    parser.add_argument("--nblocks", type=int, default=8, help="blocks per request (8 = 4 KiB)")
    parser.add_argument("--rounds", type=int, default=5, help="repeat the Cython loop, keep the best")
    parser.add_argument("--ahead", type=int, default=8, help="prefetch distance (requests)")
    args = parser.parse_args()

    build_dir = tempfile.TemporaryDirectory(prefix="san-bench-")
    pyximport.install(language_level=3, build_dir=build_dir.name)
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.append(str(Path(san.__file__).parent.parent))  # where Cython finds san/_fastmap.pxd
    from _translate_loop import translate_loop

    nsegments = TIB // MIB
    segment_blocks = MIB // BLOCK
    fast = MapTable(nsegments, segment_blocks, BLOCK)
    ref = RefMapTable(nsegments, segment_blocks, BLOCK)
    build(fast, nsegments)
    build(ref, nsegments)

    rng = random.Random(7)
    last = nsegments * segment_blocks - args.nblocks
    lbas = array("Q", (rng.randrange(0, last) for _ in range(args.lookups)))

    def cython_ns(ahead: int) -> float:
        best = float("inf")
        for _ in range(args.rounds):
            start = time.perf_counter_ns()
            extents = translate_loop(fast, lbas, args.nblocks, False, ahead)
            best = min(best, (time.perf_counter_ns() - start) / len(lbas))
            if extents != len(lbas):
                raise SystemExit(f"the Cython loop faulted: {extents} extents for {len(lbas)} lookups")
        return best

    single = cython_ns(0)
    best = cython_ns(args.ahead)

    sample = lbas[: args.python_lookups]
    translate = ref.translate
    start = time.perf_counter_ns()
    for lba in sample:
        translate(lba, args.nblocks, False)
    python_ns = (time.perf_counter_ns() - start) / len(sample)

    for lba in sample[:1000]:
        if fast.translate(lba, args.nblocks) != ref.translate(lba, args.nblocks):
            raise SystemExit(f"the tables disagree at lba {lba}")

    print(f"vdisk 1 TiB, segment 1 MiB, {nsegments} entries, {args.nblocks}-block requests")
    print(f"cython loop, one lookup at a time: {single:.1f} ns each (a cache miss per lookup: 12 MiB of entries)")
    print(f"cython loop, entry prefetched {args.ahead} requests ahead: {best:.1f} ns each (best of {args.rounds})")
    print(f"python reference: {len(sample)} lookups: {python_ns:.1f} ns each")
    print(f"fastmap ns_per_lookup={best:.1f} python_ratio={python_ns / best:.1f}")


if __name__ == "__main__":
    main()
