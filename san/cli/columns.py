"""lvs-style listings: `-o` picks the columns (`-o +serial` adds to the default ones), `--units` the size unit,
`--noheadings` and `--separator` make output for scripts. Columns are named like the fields they show."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from san.cli.output import plain, table
from san.client import Pool, VDisk
from san.units import UNITS, format_size

UNIT_CHOICES = ("h", "b", "k", "m", "g", "t")


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Any], Any]
    size: bool = False  # a byte count, shown in --units


POOL_COLUMNS = {
    "name": Column("NAME", lambda p: p.name),
    "segment": Column("SEGMENT", lambda p: p.segment_size, size=True),
    "capacity": Column("CAPACITY", lambda p: p.capacity_bytes, size=True),
    "used": Column("USED", lambda p: p.used_bytes, size=True),
    "free": Column("FREE", lambda p: p.free_bytes, size=True),
    "data": Column("DATA%", lambda p: f"{p.used_percent:.2f}"),
    "provisioned": Column("PROVISIONED", lambda p: p.provisioned_bytes, size=True),
    "vdisks": Column("VDISKS", lambda p: p.vdisks),
    "state": Column("STATE", lambda p: p.state),
    "warn": Column("WARN%", lambda p: p.warn_percent),
    "path": Column("PATH", lambda p: ",".join(c.path for c in p.containers) or "-"),
    "kind": Column("KIND", lambda p: ",".join(c.kind for c in p.containers) or "-"),
}
POOL_DEFAULT = ("name", "segment", "capacity", "used", "free", "data", "provisioned", "vdisks", "state", "path")

VDISK_COLUMNS = {
    "name": Column("NAME", lambda v: v.name),
    "pool": Column("POOL", lambda v: v.pool),
    "size": Column("SIZE", lambda v: v.size_bytes, size=True),
    "allocated": Column("ALLOCATED", lambda v: v.allocated_bytes, size=True),
    "data": Column("DATA%", lambda v: f"{v.data_percent:.2f}"),
    "type": Column("TYPE", lambda v: "thin" if v.thin else "thick"),
    "block": Column("BLOCK", lambda v: v.block_size),
    "state": Column("STATE", lambda v: v.state if v.state == "ready" else f"{v.state} {v.progress * 100:.0f}%"),
    "serial": Column("SERIAL", lambda v: v.serial),
}
VDISK_DEFAULT = ("name", "pool", "size", "allocated", "data", "type", "block", "state")


def add_options(parser: argparse.ArgumentParser, columns: dict[str, Column], default: Sequence[str]) -> None:
    parser.add_argument(
        "-o",
        "--options",
        metavar="COLUMNS",
        help=f"columns, comma-separated ({', '.join(columns)}); +COLUMNS adds to the default ({','.join(default)})",
    )
    parser.add_argument(
        "--units", choices=UNIT_CHOICES, default="h", help="sizes in h (human, the default), b, k, m, g or t (powers of 1024)"
    )
    parser.add_argument("--noheadings", action="store_true", help="no header line (for scripts)")
    parser.add_argument("--separator", metavar="TEXT", help="between columns instead of aligned spaces (for scripts)")


def chosen(spec: str | None, columns: dict[str, Column], default: Sequence[str]) -> list[str]:
    """The column names -o asks for; ValueError naming an unknown one."""
    if not spec:
        return list(default)
    names = list(default) if spec.startswith("+") else []
    for name in spec.lstrip("+").split(","):
        name = name.strip().lower()
        if name not in columns:
            raise ValueError(f"unknown column {name!r}: choose from {', '.join(columns)}")
        if name not in names:
            names.append(name)
    return names


def size_in(value: int, units: str) -> str:
    if units == "h":
        return format_size(value)
    if units == "b":
        return f"{value}B"
    return f"{value / UNITS[units.upper()]:.2f}{units}"


def render(items: Sequence[Pool | VDisk], columns: dict[str, Column], names: list[str], args: argparse.Namespace) -> str:
    headers = [columns[n].header for n in names]
    rows = [
        [size_in(columns[n].value(item), args.units) if columns[n].size else columns[n].value(item) for n in names]
        for item in items
    ]
    if args.separator is not None:
        lines = [] if args.noheadings else [args.separator.join(headers)]
        lines += [args.separator.join(plain(cell) for cell in row) for row in rows]
        return "\n".join(lines)
    text = table(headers, rows)
    return "\n".join(text.splitlines()[1:]) if args.noheadings else text
