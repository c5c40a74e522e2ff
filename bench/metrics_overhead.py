"""Benchmark: what metrics cost the data path. Two `san serve` on loopback, one with `--metrics on` (every command
counted in its vdisk's map table, /metrics scraped every second while it is measured) and one with `--metrics off`,
each serving a 256 MiB thin vdisk filled with the same random data. In each round two iscsi-perf runs of 4 KiB random
reads (queue depth 32), one against each target, go at the same time: both servers share CPU 0 (the scheduler gives
each half), the initiators and the scraper run on CPU 1, so each server's IOPS is what its cost per command allows,
and the host's noise (other tenants' load moves IOPS by a third from one minute to the next) falls on both alike.
Apart, one after the other, the same runs differed by up to 1/3 each way. Two servers alike (both metrics off) side by
side differ by ~2%, the one started first being slower: so the rounds run with on started first, then with a fresh
pair with off started first.

Each scrape is checked: it must parse, and the read counter must have grown. The last line is
`metrics randread4k_ratio=<x>`, the median over the rounds of IOPS with metrics on over off (goal >= 0.97)."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from iscsi_vs_tgt import INITIATOR, SAN_IQN, perf, random_image, require, run, san_bin, san_target
from prometheus_client.parser import text_string_to_metric_families

SIZE = 256 << 20


def read_commands(api: str, token: str) -> float:
    """The vdisk's read commands as /metrics says."""
    request = urllib.request.Request(f"{api}/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "san_vdisk_commands_total" and sample.labels == {"vdisk": "disk", "op": "read"}:
                return sample.value
    raise SystemExit("/metrics has no read counter for the vdisk")


@contextlib.contextmanager
def scraping(api: str, token: str, durations: list[float]) -> Iterator[list[float]]:
    """Scrape every second in a thread while the body runs; yields the read counts seen (each scrape's seconds go
    to durations)."""
    seen: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(1.0):
            began = time.perf_counter()
            seen.append(read_commands(api, token))
            durations.append(time.perf_counter() - began)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def serving(work: Path, source: Path, name: str, cpus: str) -> Iterator[tuple[str, int]]:
    """A `san serve` (metrics on or off, as name says) with the bench vdisk zoned and filled from source."""
    with san_target(work, "--metrics", name, name=name, cpus=cpus) as (api, portal):
        san = [san_bin(), "--api", api]
        run(*san, "pool", "create", "p", "--size", "1G")
        run(*san, "vdisk", "create", "disk", "--pool", "p", "--size", str(SIZE))
        run(*san, "host", "create", "bench", "--iqn", INITIATOR)
        run(*san, "zone", "add", "bench", "disk", "--lun", "0")
        image = f"driver=iscsi,transport=tcp,portal=127.0.0.1:{portal},target={SAN_IQN},lun=0,initiator-name={INITIATOR}"
        run("qemu-img", "convert", "-n", "-f", "raw", str(source), "--target-image-opts", image)
        yield api, portal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=8, help="length of each round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds counted per pair of servers (after a warm-up)")
    args = parser.parse_args()
    require(("iscsi-perf", "qemu-img", "taskset"), "libiscsi-bin qemu-utils qemu-block-extra util-linux")
    server_cpus = ""
    if len(os.sched_getaffinity(0)) >= 2:
        first, *rest = sorted(os.sched_getaffinity(0))
        server_cpus = str(first)
        os.sched_setaffinity(0, set(rest))  # this process, its scraper and iscsi-perf: away from the servers
    runs: dict[str, list[float]] = {"on": [], "off": []}
    durations: list[float] = []
    counted = 0.0
    with tempfile.TemporaryDirectory(prefix="san-bench-") as tmp:
        source = Path(tmp) / "random.img"
        random_image(source, SIZE)
        for started in (("on", "off"), ("off", "on")):  # the one started first runs ~2% slower: both ways round
            work = Path(tmp) / "-".join(started)
            work.mkdir()
            with serving(work, source, started[0], server_cpus) as first_target, \
                    serving(work, source, started[1], server_cpus) as second_target:  # fmt: skip
                targets = dict(zip(started, (first_target, second_target), strict=True))
                token = (work / "on" / "api-token").read_text().strip()
                urls = {name: f"iscsi://127.0.0.1:{portal}/{SAN_IQN}/0" for name, (_, portal) in targets.items()}
                with concurrent.futures.ThreadPoolExecutor(2) as pool:
                    for round_index in range(args.rounds + 1):
                        with scraping(targets["on"][0], token, durations) as seen:
                            both = {name: pool.submit(perf, url, args.seconds, 8, True) for name, url in urls.items()}
                            iops = {name: future.result() for name, future in both.items()}
                        if len(seen) < args.seconds - 1 or seen != sorted(seen) or seen[-1] <= seen[0]:
                            raise SystemExit(f"the scrapes did not see the reads counted: {seen}")
                        what = "warm-up" if round_index == 0 else f"round {round_index}"
                        print(f"{started[0]} started first, {what}: metrics on {iops['on']:.0f} IOPS, off"
                              f" {iops['off']:.0f} IOPS, ratio {iops['on'] / iops['off']:.3f}", flush=True)  # fmt: skip
                        if round_index:
                            for name in runs:
                                runs[name].append(iops[name])
                counted += read_commands(targets["on"][0], token)
    on, off = statistics.mean(runs["on"]), statistics.mean(runs["off"])
    pairs = [a / b for a, b in zip(runs["on"], runs["off"], strict=True)]
    print(
        f"4k random reads side by side: metrics on {on:.0f} IOPS ({len(durations)} scrapes of"
        f" {statistics.mean(durations) * 1e3:.1f} ms mean, {max(durations) * 1e3:.1f} ms max; {counted:.0f} reads"
        f" counted), off {off:.0f} IOPS (ratio of means {on / off:.3f}); per round {min(pairs):.3f}..{max(pairs):.3f}"
    )
    print(f"metrics randread4k_ratio={statistics.median(pairs):.3f}")


if __name__ == "__main__":
    main()
