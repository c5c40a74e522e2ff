"""Benchmark: what metrics cost the data path. Two `san serve` on loopback, one with `--metrics on` (every command
counted in C in its vdisk's map table, /metrics scraped every second while it is measured) and one with
`--metrics off`, each serving a 256 MiB thin vdisk filled with the same random data; iscsi-perf runs 4 KiB random
reads (queue depth 32) against each in turn, --rounds times; the best run of each counts (the host is noisy).

Each scrape is checked: it must parse, and the read counter must have grown. The last line is
`metrics randread4k_ratio=<x>`, IOPS with metrics on over off (goal >= 0.97)."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
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
def scraping(api: str, token: str) -> Iterator[list[float]]:
    """Scrape every second in a thread while the body runs; yields the read counts seen."""
    seen: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(1.0):
            seen.append(read_commands(api, token))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=8, help="length of each iscsi-perf run")
    parser.add_argument("--rounds", type=int, default=5, help="runs per target, alternating; the best counts")
    args = parser.parse_args()
    require(("iscsi-perf", "qemu-img"), "libiscsi-bin qemu-utils qemu-block-extra")
    with tempfile.TemporaryDirectory(prefix="san-bench-") as tmp:
        work = Path(tmp)
        source = work / "random.img"
        random_image(source, SIZE)
        with san_target(work, "--metrics", "on", name="on") as (on_api, on_portal), \
                san_target(work, "--metrics", "off", name="off") as (off_api, off_portal):  # fmt: skip
            for api, portal in ((on_api, on_portal), (off_api, off_portal)):
                san = [san_bin(), "--api", api]
                run(*san, "pool", "create", "p", "--size", "1G")
                run(*san, "vdisk", "create", "disk", "--pool", "p", "--size", str(SIZE))
                run(*san, "host", "create", "bench", "--iqn", INITIATOR)
                run(*san, "zone", "add", "bench", "disk", "--lun", "0")
                target = f"driver=iscsi,transport=tcp,portal=127.0.0.1:{portal},target={SAN_IQN},lun=0,initiator-name={INITIATOR}"
                run("qemu-img", "convert", "-n", "-f", "raw", str(source), "--target-image-opts", target)
            token = (work / "on" / "api-token").read_text().strip()
            best = {"on": 0.0, "off": 0.0}
            scrapes = 0
            for round_index in range(args.rounds):
                for name, portal in (("on", on_portal), ("off", off_portal)):
                    url = f"iscsi://127.0.0.1:{portal}/{SAN_IQN}/0"
                    if name == "on":
                        with scraping(on_api, token) as seen:
                            iops = perf(url, args.seconds, 8, True)
                        if len(seen) < args.seconds - 1 or seen != sorted(seen) or seen[-1] <= seen[0]:
                            raise SystemExit(f"the scrapes did not see the reads counted: {seen}")
                        scrapes += len(seen)
                    else:
                        iops = perf(url, args.seconds, 8, True)
                    best[name] = max(best[name], iops)
                    print(f"round {round_index + 1}: metrics {name}: {iops:.0f} IOPS", flush=True)
            counted = read_commands(on_api, token)
        print(f"4k random reads: metrics on {best['on']:.0f} IOPS ({scrapes} scrapes, {counted:.0f} reads counted),"
              f" off {best['off']:.0f} IOPS")  # fmt: skip
        print(f"metrics randread4k_ratio={best['on'] / best['off']:.2f}")


if __name__ == "__main__":
    main()
