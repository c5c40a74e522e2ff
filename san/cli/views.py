"""How the CLI shows the API's objects: lvs-like tables and `show` listings, from the typed client's models."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from san.cli.output import fields, table
from san.client import Host, Model, Pool, Session, Status, VDisk, Zone
from san.units import format_size


def print_json(value: Model | Sequence[Model] | dict[str, Any]) -> None:
    """What --json prints: the API's JSON, unchanged."""
    if isinstance(value, (list, tuple)):
        data: Any = [item.to_json() for item in value]
    elif isinstance(value, Model):
        data = value.to_json()
    else:
        data = value
    print(json.dumps(data, indent=2, sort_keys=True))


def show_vdisk(v: VDisk) -> str:
    return fields(
        [
            ("name", v.name),
            ("pool", v.pool),
            ("size", f"{format_size(v.size_bytes)} ({v.size_bytes} bytes)"),
            ("allocated", f"{format_size(v.allocated_bytes)} ({v.allocated_bytes} bytes)"),
            ("provisioning", "thin" if v.thin else "thick"),
            ("block size", v.block_size),
            ("serial", v.serial),
            ("state", v.state),
            *([("snapshot of", v.snapshot_of), ("taken", v.created)] if v.snapshot_of else []),
            *([("snapshots", ", ".join(v.snapshots))] if v.snapshots else []),
        ]
    )


def snapshot_rows(snapshots: Sequence[VDisk]) -> str:
    return table(
        ["NAME", "VDISK", "SIZE", "TAKEN", "STATE"],
        [[s.name, s.snapshot_of, format_size(s.size_bytes), s.created, s.state] for s in snapshots],
    )


def show_pool(p: Pool) -> str:
    pairs: list[tuple[str, Any]] = [
        ("name", p.name),
        ("state", p.state + (f": {p.problem}" if p.problem else "")),
        ("segment size", format_size(p.segment_size)),
        ("capacity", f"{format_size(p.capacity_bytes)} ({p.capacity_bytes} bytes)"),
        ("used", f"{format_size(p.used_bytes)} ({p.used_percent:.1f}%)"),
        ("free", format_size(p.free_bytes)),
        ("provisioned", format_size(p.provisioned_bytes)),
        ("warn at", f"{p.warn_percent}%"),
        ("allocate ahead", f"{p.allocate_ahead} segments"),
        ("vdisks", p.vdisks),
    ]
    pairs += [(f"container {c.id}", f"{c.path} ({c.kind}, {format_size(c.size_bytes)}, uuid {c.uuid})") for c in p.containers]
    return fields(pairs)


def zone_rows(zones: list[Zone]) -> str:
    return table(
        ["HOST", "LUN", "VDISK", "ACCESS"],
        [[z.host, z.lun, z.vdisk, "read-only" if z.read_only else "read-write"] for z in zones],
    )


def host_rows(hosts: list[Host]) -> str:
    return table(
        ["NAME", "IQN", "CHAP", "LUNS", "SESSIONS"],
        [
            [h.name, h.iqn, ("mutual" if h.mutual_user else "one-way") if h.chap_user else "none", len(h.zones), h.sessions]
            for h in hosts
        ],
    )


def session_rows(sessions: Sequence[Session]) -> str:
    return table(
        ["INITIATOR", "HOST", "ADDRESS", "DIGESTS", "LUNS", "GATEWAY", "TSIH"],
        [
            [
                s.initiator,
                s.host or "-",
                s.address,
                "/".join(["header" if s.header_digest else "", "data" if s.data_digest else ""]).strip("/") or "none",
                ",".join(map(str, s.luns)) or "-",
                s.gateway,
                s.tsih,
            ]
            for s in sessions
        ],
    )


def show_status(s: Status) -> str:
    pairs: list[tuple[str, Any]] = [
        ("version", s.version),
        ("data dir", s.data_dir),
        ("uptime", f"{s.uptime_seconds:.0f} s"),
        ("target", s.target or "- (served by the gateways)"),
        ("frontend", s.frontend or "-"),
        ("portals", ", ".join(s.portals) or "-"),
        ("gateways", ", ".join(s.gateways) or "none"),
        ("pools", f"{s.pools}" + (f" ({s.pools_offline} offline)" if s.pools_offline else "")),
        ("vdisks", s.vdisks),
        ("hosts", s.hosts),
        ("zones", s.zones),
        ("sessions", s.sessions),
    ]
    return fields(pairs)


def chap_of(h: Host) -> str:
    if not h.chap_user:
        return "no CHAP"
    return f"CHAP user {h.chap_user}" + (f", mutual user {h.mutual_user}" if h.mutual_user else "")


def show_host(h: Host) -> str:
    chap = "none"
    if h.chap_user:
        chap = f"user {h.chap_user}" + (f", mutual user {h.mutual_user}" if h.mutual_user else "")
    pairs: list[tuple[str, Any]] = [("name", h.name), ("iqn", h.iqn), ("chap", chap), ("sessions", h.sessions)]
    pairs += [(f"lun {z.lun}", f"{z.vdisk} ({'read-only' if z.read_only else 'read-write'})") for z in h.zones]
    return fields(pairs)
