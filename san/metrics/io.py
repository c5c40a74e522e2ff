"""The per-vdisk I/O metrics: each map table's C counters (commands, bytes, errors, latency buckets) turned into
Prometheus families at scrape time; nothing here runs per command."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from san._fastmap import IO_KIND_NAMES, LATENCY_BOUNDS, MapTable

BOUNDS = [repr(bound) for bound in LATENCY_BOUNDS] + ["+Inf"]


def vdisk_io(tables: Iterable[tuple[str, MapTable]]) -> Iterator[Metric]:
    """The I/O families over (vdisk name, its map table) pairs, labelled vdisk and op (read, write, unmap, flush)."""
    labels = ["vdisk", "op"]
    commands = CounterMetricFamily("san_vdisk_commands", "SCSI commands completed with GOOD status", labels=labels)
    moved = CounterMetricFamily(
        "san_vdisk_bytes", "Bytes those commands read, wrote or unmapped (flushes move none)", labels=labels
    )
    errors = CounterMetricFamily("san_vdisk_errors", "Commands completed with any other status", labels=labels)
    latency = HistogramMetricFamily(
        "san_vdisk_latency_seconds", "Time from a command's arrival to its response, GOOD ones", labels=labels
    )
    for name, table in tables:
        for kind, stat in zip(IO_KIND_NAMES, table.io_stats(), strict=True):
            values = [name, kind]
            commands.add_metric(values, stat.commands)
            moved.add_metric(values, stat.bytes)
            errors.add_metric(values, stat.errors)
            cumulative, buckets = 0, []
            for bound, count in zip(BOUNDS, stat.buckets, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric(values, buckets, stat.latency_seconds)
    yield from (commands, moved, errors, latency)
