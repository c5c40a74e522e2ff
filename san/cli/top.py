"""`san top`: per-vdisk IOPS, MB/s and latency in the terminal, from /metrics scraped every interval (the API's for
`san serve`, and each gateway's given with --gateway), like iostat -x for vdisks.

Rates are differences between two scrapes; latency is the mean over the interval (sum over count)."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass

from san.cli.output import table
from san.client import SanClient

KINDS = ("read", "write", "unmap", "flush")
Counters = dict[tuple[str, str], list[float]]  # (vdisk, op) -> [commands, bytes, latency sum, latency count]


def counters(texts: list[str]) -> Counters:
    """The I/O counters of every scraped exposition, summed over them per (vdisk, op)."""
    from prometheus_client.parser import text_string_to_metric_families  # only `san top` needs the parser

    found: Counters = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    slots = {
        "san_vdisk_commands_total": 0,
        "san_vdisk_bytes_total": 1,
        "san_vdisk_latency_seconds_sum": 2,
        "san_vdisk_latency_seconds_count": 3,
    }
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                slot = slots.get(sample.name)
                if slot is not None:
                    found[(sample.labels["vdisk"], sample.labels["op"])][slot] += sample.value
    return found


@dataclass
class Rates:
    """One vdisk over one interval."""

    iops: dict[str, float]
    mbps: dict[str, float]
    latency_ms: dict[str, float]


def rates(before: Counters, after: Counters, seconds: float) -> dict[str, Rates]:
    out: dict[str, Rates] = {}
    for vdisk in sorted({v for v, _ in after}):
        iops, mbps, latency = {}, {}, {}
        for kind in KINDS:
            old, new = before.get((vdisk, kind), [0.0] * 4), after.get((vdisk, kind), [0.0] * 4)
            if new[0] < old[0]:  # a counter reset (the table was made anew): count from zero
                old = [0.0] * 4
            iops[kind] = (new[0] - old[0]) / seconds
            mbps[kind] = (new[1] - old[1]) / seconds / 1e6
            count = new[3] - old[3]
            latency[kind] = 1000 * (new[2] - old[2]) / count if count else 0.0
        out[vdisk] = Rates(iops, mbps, latency)
    return out


def render(found: dict[str, Rates], interval: float) -> str:
    headers = ["VDISK", "r/s", "w/s", "rMB/s", "wMB/s", "r_ms", "w_ms", "unmap/s", "flush/s", "f_ms"]
    rows = [
        [
            name,
            f"{r.iops['read']:.0f}",
            f"{r.iops['write']:.0f}",
            f"{r.mbps['read']:.2f}",
            f"{r.mbps['write']:.2f}",
            f"{r.latency_ms['read']:.3f}",
            f"{r.latency_ms['write']:.3f}",
            f"{r.iops['unmap']:.0f}",
            f"{r.iops['flush']:.0f}",
            f"{r.latency_ms['flush']:.3f}",
        ]
        for name, r in sorted(found.items(), key=lambda item: -(item[1].iops["read"] + item[1].iops["write"]))
    ]
    stamp = time.strftime("%H:%M:%S")
    body = table(headers, rows) if rows else "no vdisk is being served"
    return f"san top - {stamp}, every {interval:g} s (latency: mean in ms)\n\n{body}"


def top(sources: list[SanClient], interval: float, count: int | None) -> int:
    """Print a refreshed table every interval until interrupted (or count times); on a terminal, in place."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    previous = counters([source.text("/metrics") for source in sources])
    taken = time.monotonic()
    shown = 0
    while count is None or shown < count:
        time.sleep(max(interval - (time.monotonic() - taken), 0))
        current = counters([source.text("/metrics") for source in sources])
        now = time.monotonic()
        print(clear + render(rates(previous, current, now - taken), interval), flush=True)
        if not clear:
            print()
        previous, taken = current, now
        shown += 1
    return 0
