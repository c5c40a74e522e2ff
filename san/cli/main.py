"""The `san` command: `serve` and `check` work on a data directory; the rest are clients of the API.

Every error prints one line on stderr and exits 1; --json prints the API's JSON unchanged. Secrets are read from
files, stdin or a prompt, never from the command line (where ps shows them)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Coroutine
from typing import Any, NoReturn
from urllib.parse import quote

from san.cli.client import DEFAULT_API, ApiError, Client
from san.cli.output import fields, plain, progress, table
from san.units import format_size, parse_size


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def default_iqn() -> str:
    return f"iqn.2003-01.org.san:{socket.gethostname().lower()}"


def _hostport(text: str) -> tuple[str, int]:
    if text == "none":
        return ("", 0)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `san: <what is wrong>` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {plain(message)[:500]}\n")


class SecretOnCommandLine(argparse.Action):
    """--chap-secret and --mutual-secret are refused: ps shows every process's command line to every user."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        flag = self.option_strings[0]
        parser.error(
            f"{flag} is not accepted (every user can see a command line): use {flag}-file FILE, {flag}-file - for stdin,"
            " or leave it out to be asked"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="san", description="A software SAN target: pools, thin vdisks, iSCSI.")
    parser.add_argument(
        "--api", default=os.environ.get("SAN_API", DEFAULT_API), help="management API URL (env SAN_API; default %(default)s)"
    )
    parser.add_argument(
        "--token-file",
        default=os.environ.get("SAN_TOKEN_FILE"),
        help="file holding the API token (env SAN_TOKEN_FILE; default: the one the server published for --api, readable by root)",
    )
    parser.add_argument(
        "--ca-file", default=os.environ.get("SAN_CA_FILE"), help="CA certificate to verify an https API with (env SAN_CA_FILE)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = Parser(add_help=False)
    client.add_argument("--api", default=argparse.SUPPRESS, help="management API URL (as before the command)")
    client.add_argument("--token-file", default=argparse.SUPPRESS, help="file holding the API token (as before the command)")
    client.add_argument("--ca-file", default=argparse.SUPPRESS, help="CA certificate for an https API (as before the command)")

    serve = commands.add_parser("serve", help="run the controller, an agent and the management API")
    serve.add_argument("--data", required=True, help="data directory (store, default pool files; mode 0700)")
    serve.add_argument(
        "--api",
        dest="listen",
        type=_hostport,
        default=("127.0.0.1", 8080),
        help="HOST:PORT to serve the API on (default 127.0.0.1:8080; beyond loopback only with --api-cert/--api-key)",
    )
    serve.add_argument("--api-cert", help="TLS certificate (PEM) for the API")
    serve.add_argument("--api-key", help="TLS private key (PEM) for the API")
    serve.add_argument(
        "--api-token-file", help="file (mode 0600) holding the API token (default: DATA/api-token, made at first start)"
    )
    serve.add_argument(
        "--allow-path",
        action="append",
        default=[],
        metavar="DIR",
        help="directory under which existing regular files may be taken over as pools (pool create --existing); repeatable",
    )
    serve.add_argument("--max-connections", type=int, default=1024, help="iSCSI connections open at once (default 1024)")
    serve.add_argument(
        "--max-connections-per-address", type=int, default=64, help="iSCSI connections from one address (default 64)"
    )
    serve.add_argument("--commit-interval", type=float, default=1.0, help="seconds between metadata commits")
    serve.add_argument(
        "--portal",
        action="append",
        type=_hostport,
        help="HOST:PORT for iSCSI (repeatable; default 0.0.0.0:3260); --portal none serves no iSCSI",
    )
    serve.add_argument("--iqn", default=default_iqn(), help="the target's iSCSI name (default %(default)s)")
    serve.add_argument(
        "--open-access",
        action="store_true",
        help="demo mode: every initiator sees every vdisk, with no CHAP (never on a shared network)",
    )
    serve.add_argument(
        "--frontend",
        choices=["iscsi", "lio", "auto"],
        default="iscsi",
        help="iscsi: the built-in target (default); lio: the kernel's LIO target with san's TCMU handler; "
        "auto: lio when LIO and target_core_user are loaded, else iscsi",
    )
    serve.add_argument(
        "--metrics",
        choices=["on", "off"],
        default="on",
        help="on: Prometheus metrics at the API's /metrics, each command counted in its vdisk's statistics (default %(default)s)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    demo = commands.add_parser("demo", help="serve a demo thin vdisk that every initiator may use (demo mode)")
    demo.add_argument("--data", required=True, help="data directory (created if missing)")
    demo.add_argument("--api", dest="listen", type=_hostport, default=("127.0.0.1", 8080), help="HOST:PORT for the API")
    demo.add_argument("--portal", type=_hostport, default=("127.0.0.1", 3260), help="HOST:PORT for iSCSI")
    demo.add_argument("--iqn", default=default_iqn(), help="the target's iSCSI name (default %(default)s)")
    demo.add_argument("--size", type=_size_arg, default="10G", help="size of the demo vdisk (default 10G)")

    check = commands.add_parser("check", help="check a data directory's store offline (exit 1 on damage)")
    check.add_argument("--data", required=True, help="data directory")

    role = commands.add_parser("controller", help="run the controller alone: store, management API, listener for gateways")
    role.add_argument("--data", required=True, help="data directory (store, default pool files; mode 0700)")
    role.add_argument("--listen", required=True, type=_hostport, help="HOST:PORT to listen for gateways on (mutual TLS)")
    role.add_argument("--cluster", required=True, help="the cluster directory (san cluster init)")
    role.add_argument("--name", default="controller", help="this node's name in the cluster (default %(default)s)")
    role.add_argument(
        "--api", dest="listen_api", type=_hostport, default=("127.0.0.1", 8080), help="HOST:PORT for the management API"
    )
    role.add_argument("--api-cert", help="TLS certificate (PEM) for the API")
    role.add_argument("--api-key", help="TLS private key (PEM) for the API")
    role.add_argument("--api-token-file", help="file (mode 0600) holding the API token (default: DATA/api-token)")
    role.add_argument("--lease", type=float, default=10.0, help="seconds a gateway's lease lasts without renewal (default 10)")
    role.add_argument("--commit-interval", type=float, default=1.0, help="seconds between metadata commits")
    role.add_argument("--allow-path", action="append", default=[], metavar="DIR", help="as for san serve")
    role.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    role = commands.add_parser("gateway", help="run a gateway: an agent and an iSCSI frontend, fed by the controller")
    role.add_argument("--name", required=True, help="this node's name in the cluster")
    role.add_argument("--controller", required=True, help="HOST:PORT[,HOST:PORT...] of the controller (tried in turn)")
    role.add_argument("--cluster", required=True, help="the cluster directory (this node's certificate and the CA)")
    role.add_argument(
        "--controller-name", default="controller", help="the controller's node name in the cluster (default %(default)s)"
    )
    role.add_argument(
        "--storage",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory whose files may be containers (found by their labels; block devices are always searched); repeatable",
    )
    role.add_argument(
        "--direct-io",
        choices=["auto", "on", "off"],
        default="auto",
        help="open containers with O_DIRECT, bypassing this host's page cache: auto for block devices (a disk shared "
        "by gateways on several hosts), on for files too (shared over a file system that does not keep caches "
        "coherent), off only when every gateway runs on the host that holds the storage (default %(default)s)",
    )
    role.add_argument("--portal", action="append", type=_hostport, help="HOST:PORT for iSCSI (repeatable; default 0.0.0.0:3260)")
    role.add_argument(
        "--iqn", default=default_iqn(), help="the target's iSCSI name, the same on every gateway (default %(default)s)"
    )
    role.add_argument("--frontend", choices=["iscsi", "lio", "auto"], default="iscsi", help="as for san serve")
    role.add_argument(
        "--suspend-timeout",
        type=float,
        default=60.0,
        help="seconds I/O waits for an unreachable controller before it fails with a retryable status (default 60)",
    )
    role.add_argument("--max-connections", type=int, default=1024, help="iSCSI connections open at once (default 1024)")
    role.add_argument(
        "--max-connections-per-address", type=int, default=64, help="iSCSI connections from one address (default 64)"
    )
    role.add_argument(
        "--metrics",
        type=_hostport,
        metavar="HOST:PORT",
        help="serve Prometheus metrics (this gateway's vdisk I/O, faults, lease, sessions) at http://HOST:PORT/metrics; "
        "beyond loopback only with --metrics-cert/--metrics-key (default: none, and no I/O counting)",
    )
    role.add_argument("--metrics-cert", help="TLS certificate (PEM) for the metrics listener")
    role.add_argument("--metrics-key", help="TLS private key (PEM) for the metrics listener")
    role.add_argument(
        "--metrics-token-file",
        help="file (mode 0600) holding the bearer token Prometheus sends (default: CLUSTER/metrics-token, made at first start)",
    )
    role.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    cluster = commands.add_parser("cluster", help="make a cluster's certificates (controller and gateways)").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    init = cluster.add_parser("init", help="create a cluster directory: a CA and a certificate + key per node (0600)")
    init.add_argument("directory", help="the cluster directory to create (must be new or empty)")
    init.add_argument("--nodes", required=True, help="comma-separated node names, e.g. controller,gw1,gw2")
    add = cluster.add_parser("add", help="add a node: a new certificate + key signed by the cluster's CA")
    add.add_argument("directory", help="the cluster directory (with ca.key)")
    add.add_argument("name", help="the new node's name")
    cluster.add_parser("list", help="list the cluster's nodes").add_argument("directory")

    status = commands.add_parser("status", parents=[client], help="show the service's status")
    status.add_argument("--json", action="store_true")

    config = commands.add_parser("config", help="export or import the configuration as JSON").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    export = config.add_parser("export", parents=[client], help="pools, vdisks, hosts and zones (definitions, not data) as JSON")
    export.add_argument("--out", metavar="FILE", help="write to FILE (atomically, mode 0600; a FILE there is kept under backup/)")
    export.add_argument("--with-secrets", action="store_true", help="include the hosts' CHAP secrets (keep the file safe)")
    imported = config.add_parser(
        "import", parents=[client], help="make what a file describes (what exists and matches is kept; conflicts change nothing)"
    )
    imported.add_argument("file", metavar="FILE")
    imported.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")

    top = commands.add_parser("top", parents=[client], help="per-vdisk IOPS, MB/s and latency, refreshed (from /metrics)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default %(default)s)")
    top.add_argument("--count", type=int, help="refresh this many times, then exit (default: until interrupted)")
    top.add_argument(
        "--gateway",
        action="append",
        default=[],
        metavar="URL",
        help="a gateway's metrics listener (san gateway --metrics), added to the API's figures; repeatable",
    )

    pool = commands.add_parser("pool", help="manage pools").add_subparsers(dest="action", required=True, metavar="ACTION")
    create = pool.add_parser("create", parents=[client], help="create a pool on a new sparse file or an existing file/device")
    create.add_argument("name")
    create.add_argument("--size", type=_size_arg, help="size, e.g. 100G (required for a new file)")
    create.add_argument("--path", help="new file, unused block device, or existing file (default: DATA/pools/NAME.img)")
    create.add_argument(
        "--existing",
        action="store_true",
        help="take over an existing regular file under an --allow-path directory (its contents are overwritten)",
    )
    create.add_argument("--segment-size", type=_size_arg, default="1M", help="power of two, 64K-1G (default 1M)")
    create.add_argument("--warn-percent", type=int, default=80, help="fullness that raises the threshold warning")
    create.add_argument("--allocate-ahead", type=int, default=4, help="extra segments allocated for sequential writers")
    pool.add_parser("list", parents=[client], help="list pools").add_argument("--json", action="store_true")
    show = pool.add_parser("show", parents=[client], help="show one pool")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    pool.add_parser("delete", parents=[client], help="delete an empty pool (files san created are removed)").add_argument("name")

    vdisk = commands.add_parser("vdisk", help="manage virtual disks").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = vdisk.add_parser("create", parents=[client], help="create a vdisk (thin unless --thick)")
    create.add_argument("name")
    create.add_argument("--pool", required=True)
    create.add_argument("--size", type=_size_arg, required=True, help="size, e.g. 10G")
    create.add_argument("--thick", action="store_true", help="allocate every segment now")
    create.add_argument("--block-size", type=int, choices=[512, 4096], default=512)
    vdisk.add_parser("list", parents=[client], help="list vdisks").add_argument("--json", action="store_true")
    show = vdisk.add_parser("show", parents=[client], help="show one vdisk")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    grow = vdisk.add_parser("grow", parents=[client], help="grow a vdisk")
    grow.add_argument("name")
    grow.add_argument("--size", type=_size_arg, required=True, help="new size, e.g. 20G")
    vdisk.add_parser("delete", parents=[client], help="delete a vdisk; its segments go back to the pool").add_argument("name")

    host = commands.add_parser("host", help="manage hosts (initiators)").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = host.add_parser("create", parents=[client], help="add an initiator by its iSCSI name")
    create.add_argument("name")
    create.add_argument("--iqn", required=True, help="the initiator's iSCSI name")
    create.add_argument("--chap-user", default="", help="CHAP user the initiator logs in with")
    create.add_argument(
        "--chap-secret-file", metavar="FILE", help="file holding its CHAP secret (12-255 characters), - for stdin; default: ask"
    )
    create.add_argument("--mutual-user", default="", help="user the target answers mutual CHAP with")
    create.add_argument("--mutual-secret-file", metavar="FILE", help="file holding the target's mutual CHAP secret, - for stdin")
    create.add_argument("--chap-secret", nargs="?", action=SecretOnCommandLine, help=argparse.SUPPRESS)
    create.add_argument("--mutual-secret", nargs="?", action=SecretOnCommandLine, help=argparse.SUPPRESS)
    host.add_parser("list", parents=[client], help="list hosts").add_argument("--json", action="store_true")
    show = host.add_parser("show", parents=[client], help="show one host and its LUNs")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    host.add_parser("delete", parents=[client], help="delete a host with no zones").add_argument("name")

    zone = commands.add_parser("zone", help="manage zoning: which host sees which vdisk").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    add = zone.add_parser("add", parents=[client], help="let a host see a vdisk")
    add.add_argument("host")
    add.add_argument("vdisk")
    add.add_argument("--lun", type=int, help="LUN number (default: the lowest free one)")
    add.add_argument("--read-only", action="store_true", help="the host may only read")
    remove = zone.add_parser("remove", parents=[client], help="stop a host seeing a vdisk")
    remove.add_argument("host")
    remove.add_argument("vdisk")
    zone.add_parser("list", parents=[client], help="list zones").add_argument("--json", action="store_true")
    return parser


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _pool_rows(pools: list[dict[str, Any]]) -> str:
    return table(
        ["NAME", "SEGMENT", "CAPACITY", "USED", "FREE", "USED%", "PROVISIONED", "VDISKS", "STATE"],
        [
            [
                p["name"],
                format_size(p["segment_size"]),
                format_size(p["capacity_bytes"]),
                format_size(p["used_bytes"]),
                format_size(p["free_bytes"]),
                f"{p['used_percent']:.1f}%",
                format_size(p["provisioned_bytes"]),
                p["vdisks"],
                p["state"],
            ]
            for p in pools
        ],
    )


def _vdisk_rows(vdisks: list[dict[str, Any]]) -> str:
    return table(
        ["NAME", "POOL", "SIZE", "ALLOCATED", "TYPE", "BLOCK", "STATE"],
        [
            [
                v["name"],
                v["pool"],
                format_size(v["size_bytes"]),
                format_size(v["allocated_bytes"]),
                "thin" if v["thin"] else "thick",
                v["block_size"],
                v["state"] if v["state"] == "ready" else f"{v['state']} {v['progress'] * 100:.0f}%",
            ]
            for v in vdisks
        ],
    )


def _show_vdisk(v: dict[str, Any]) -> str:
    return fields(
        [
            ("name", v["name"]),
            ("pool", v["pool"]),
            ("size", f"{format_size(v['size_bytes'])} ({v['size_bytes']} bytes)"),
            ("allocated", f"{format_size(v['allocated_bytes'])} ({v['allocated_bytes']} bytes)"),
            ("provisioning", "thin" if v["thin"] else "thick"),
            ("block size", v["block_size"]),
            ("serial", v["serial"]),
            ("state", v["state"]),
        ]
    )


def _show_pool(p: dict[str, Any]) -> str:
    pairs = [
        ("name", p["name"]),
        ("state", p["state"] + (f": {p['problem']}" if p["problem"] else "")),
        ("segment size", format_size(p["segment_size"])),
        ("capacity", f"{format_size(p['capacity_bytes'])} ({p['capacity_bytes']} bytes)"),
        ("used", f"{format_size(p['used_bytes'])} ({p['used_percent']:.1f}%)"),
        ("free", format_size(p["free_bytes"])),
        ("provisioned", format_size(p["provisioned_bytes"])),
        ("warn at", f"{p['warn_percent']}%"),
        ("allocate ahead", f"{p['allocate_ahead']} segments"),
        ("vdisks", p["vdisks"]),
    ]
    pairs += [
        (f"container {c['id']}", f"{c['path']} ({c['kind']}, {format_size(c['size_bytes'])}, uuid {c['uuid']})")
        for c in p["containers"]
    ]
    return fields(pairs)


def _zone_rows(zones: list[dict[str, Any]]) -> str:
    return table(
        ["HOST", "LUN", "VDISK", "ACCESS"],
        [[z["host"], z["lun"], z["vdisk"], "read-only" if z["read_only"] else "read-write"] for z in zones],
    )


def _host_rows(hosts: list[dict[str, Any]]) -> str:
    return table(
        ["NAME", "IQN", "CHAP", "LUNS", "SESSIONS"],
        [
            [
                h["name"],
                h["iqn"],
                ("mutual" if h["mutual_user"] else "one-way") if h["chap_user"] else "none",
                len(h["zones"]),
                h["sessions"],
            ]
            for h in hosts
        ],
    )


def _show_host(h: dict[str, Any]) -> str:
    chap = "none"
    if h["chap_user"]:
        chap = f"user {h['chap_user']}" + (f", mutual user {h['mutual_user']}" if h["mutual_user"] else "")
    pairs = [("name", h["name"]), ("iqn", h["iqn"]), ("chap", chap), ("sessions", h["sessions"])]
    pairs += [(f"lun {z['lun']}", f"{z['vdisk']} ({'read-only' if z['read_only'] else 'read-write'})") for z in h["zones"]]
    return fields(pairs)


def _read_secret(path: str, what: str) -> str:
    """A secret from a file, or from stdin for '-' (one line; the newline is not part of it)."""
    try:
        if path == "-":
            text = sys.stdin.readline()
        else:
            with open(path) as f:
                text = f.read()
    except OSError as exc:
        raise ApiError(f"cannot read the {what} from {path}: {exc.strerror}") from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise ApiError(f"the {what} file {path} is empty")
    return secret


def _ask_secret(what: str) -> str:
    if not sys.stdin.isatty():
        raise ApiError(f"give the {what} with --{what.replace(' ', '-')}-file FILE (or - for stdin): no terminal to ask on")
    try:
        first = getpass.getpass(f"{what}: ")
        again = getpass.getpass(f"{what} again: ")
    except EOFError:
        raise ApiError(f"no {what} given") from None
    if again != first:
        raise ApiError(f"the two {what}s differ")
    return first


def _secrets(args: argparse.Namespace) -> dict[str, str]:
    """The CHAP secrets for host create: from their files, stdin, or a prompt when a user is given without one."""
    if args.chap_secret_file == "-" and args.mutual_secret_file == "-":
        raise ApiError("only one secret can come from stdin: give the other in a file")
    found = {"chap_secret": "", "mutual_secret": ""}
    for key, user, path, what in (
        ("chap_secret", args.chap_user, args.chap_secret_file, "chap secret"),
        ("mutual_secret", args.mutual_user, args.mutual_secret_file, "mutual secret"),
    ):
        if path is not None:
            found[key] = _read_secret(path, what)
        elif user:
            found[key] = _ask_secret(what)
    return found


def _run_zoning(client: Client, args: argparse.Namespace) -> int:
    if args.command == "host":
        if args.action == "create":
            secrets = _secrets(args)
            body = {"name": args.name, "iqn": args.iqn, "chap_user": args.chap_user, "mutual_user": args.mutual_user, **secrets}
            host = client.post("/hosts", body)
            print(f"host {plain(host['name'])} created for {plain(host['iqn'])}")
            for warning in host.get("warnings", []):
                print(f"san: warning: {plain(warning)}", file=sys.stderr)
        elif args.action == "list":
            hosts = client.get("/hosts")
            _print_json(hosts) if args.json else print(_host_rows(hosts))
        elif args.action == "show":
            host = client.get(f"/hosts/{quote(args.name, safe='')}")
            _print_json(host) if args.json else print(_show_host(host))
        elif args.action == "delete":
            client.delete(f"/hosts/{quote(args.name, safe='')}")
            print(f"host {args.name} deleted")
        return 0
    if args.action == "add":
        zone = client.post("/zones", {"host": args.host, "vdisk": args.vdisk, "lun": args.lun, "read_only": args.read_only})
        access = "read-only" if zone["read_only"] else "read-write"
        print(f"host {zone['host']} sees {zone['vdisk']} as LUN {zone['lun']} ({access})")
    elif args.action == "remove":
        client.delete(f"/zones/{quote(args.host, safe='')}/{quote(args.vdisk, safe='')}")
        print(f"host {args.host} no longer sees {args.vdisk}")
    elif args.action == "list":
        zones = client.get("/zones")
        _print_json(zones) if args.json else print(_zone_rows(zones))
    return 0


def _run_config(client: Client, args: argparse.Namespace) -> int:
    from san.cli import config

    if args.action == "export":
        document = config.export(client, args.with_secrets)
        if args.out is None:
            print(json.dumps(document, indent=2, sort_keys=True))
            return 0
        try:
            backup = config.save(document, args.out)
        except OSError as exc:
            raise ApiError(f"cannot write {args.out}: {exc.strerror or exc}") from None
        counts = ", ".join(f"{len(document[k])} {k}" for k in ("pools", "vdisks", "hosts", "zones"))
        print(f"configuration saved to {args.out} ({counts}){f'; the previous one is {backup}' if backup else ''}")
        return 0
    todo = config.plan(client, config.load(args.file))
    if todo.conflicts:
        raise config.ConfigConflict(todo.conflicts)
    steps = [what for what, *_ in todo.steps + todo.grows]
    if args.dry_run:
        for what in steps:
            print(f"would {what}")
        print(f"{len(steps)} change(s), {todo.unchanged} unchanged (dry run: nothing was changed)")
        return 0
    for what in config.apply(client, todo):
        print(what)
    print(f"{len(steps)} change(s), {todo.unchanged} unchanged")
    return 0


def _wait_thick(client: Client, vdisk: dict[str, Any]) -> dict[str, Any]:
    label = f"allocating {vdisk['name']}"
    while vdisk["state"] == "allocating":
        progress(vdisk["progress"], label)
        time.sleep(0.2)
        vdisk = client.get(f"/vdisks/{quote(vdisk['name'], safe='')}")
    progress(1.0, label)
    return vdisk


def run_client(args: argparse.Namespace) -> int:
    client = Client(args.api, args.token_file, args.ca_file)
    if args.command == "config":
        return _run_config(client, args)
    if args.command == "top":
        from san.cli.top import top

        if not args.interval > 0 or (args.count is not None and args.count < 1):
            raise ApiError("--interval must be positive and --count at least 1")
        return top([client, *(Client(url, None, args.ca_file) for url in args.gateway)], args.interval, args.count)
    if args.command == "status":
        status = client.get("/status")
        if args.json:
            _print_json(status)
        else:
            print(fields([(k.replace("_", " "), v) for k, v in status.items()]))
        return 0
    if args.command == "pool":
        if args.action == "create":
            body = {
                "name": args.name,
                "size": args.size,
                "path": os.path.abspath(args.path) if args.path else None,
                "existing": args.existing,
                "segment_size": args.segment_size,
                "warn_percent": args.warn_percent,
                "allocate_ahead": args.allocate_ahead,
            }
            pool = client.post("/pools", body)
            print(
                f"pool {pool['name']} created: {format_size(pool['capacity_bytes'])}"
                f" in {format_size(pool['segment_size'])} segments"
            )
        elif args.action == "list":
            pools = client.get("/pools")
            _print_json(pools) if args.json else print(_pool_rows(pools))
        elif args.action == "show":
            pool = client.get(f"/pools/{quote(args.name, safe='')}")
            _print_json(pool) if args.json else print(_show_pool(pool))
        elif args.action == "delete":
            client.delete(f"/pools/{quote(args.name, safe='')}")
            print(f"pool {args.name} deleted")
        return 0
    if args.command in ("host", "zone"):
        return _run_zoning(client, args)
    if args.action == "create":
        body = {"name": args.name, "pool": args.pool, "size": args.size, "thick": args.thick, "block_size": args.block_size}
        vdisk = client.post("/vdisks", body)
        if vdisk["state"] == "allocating":
            vdisk = _wait_thick(client, vdisk)
        print(
            f"vdisk {vdisk['name']} created: {format_size(vdisk['size_bytes'])}"
            f" {'thin' if vdisk['thin'] else 'thick'} in pool {vdisk['pool']}"
        )
    elif args.action == "list":
        vdisks = client.get("/vdisks")
        _print_json(vdisks) if args.json else print(_vdisk_rows(vdisks))
    elif args.action == "show":
        vdisk = client.get(f"/vdisks/{quote(args.name, safe='')}")
        _print_json(vdisk) if args.json else print(_show_vdisk(vdisk))
    elif args.action == "grow":
        vdisk = client.post(f"/vdisks/{quote(args.name, safe='')}/grow", {"size": args.size})
        print(f"vdisk {vdisk['name']} grown to {format_size(vdisk['size_bytes'])}")
    elif args.action == "delete":
        client.delete(f"/vdisks/{quote(args.name, safe='')}")
        print(f"vdisk {args.name} deleted")
    return 0


def run_check(data: str) -> int:
    from san.service import DB_NAME
    from san.store.check import check_store

    problems, summary = check_store(os.path.join(data, DB_NAME))
    for line in summary:
        print(line)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print("clean")
    return 0


def _log_to_stderr(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_cluster(args: argparse.Namespace) -> int:
    from san.cluster.pki import Cluster, ClusterError

    os.umask(0o077)
    try:
        if args.action == "init":
            cluster = Cluster.init(args.directory, [n.strip() for n in args.nodes.split(",") if n.strip()])
            print(f"cluster {args.directory}: CA and nodes {', '.join(cluster.nodes())}")
            print("copy the directory to each gateway host; ca.key is needed only where nodes are added")
        elif args.action == "add":
            Cluster.open(args.directory).add(args.name)
            print(f"node {args.name} added to {args.directory}")
        else:
            for node in Cluster.open(args.directory).nodes():
                print(node)
    except ClusterError as exc:
        print(f"san: {plain(exc)}", file=sys.stderr)
        return 1
    return 0


def run_controller(args: argparse.Namespace) -> int:
    from san.roles import ControllerOptions, controller

    _log_to_stderr(args.log_level)
    if not args.lease > 0:
        print("san: --lease must be more than 0 seconds", file=sys.stderr)
        return 2
    options = ControllerOptions(
        args.data,
        args.listen,
        args.cluster,
        args.name,
        args.listen_api,
        args.lease,
        args.commit_interval,
        tuple(args.allow_path),
        args.api_cert,
        args.api_key,
        args.api_token_file,
    )
    return run_loop(controller(options))


def run_gateway(args: argparse.Namespace) -> int:
    from san.iscsi.server import Limits
    from san.roles import GatewayOptions, gateway

    _log_to_stderr(args.log_level)
    try:
        controllers = [_hostport(part) for part in args.controller.split(",") if part]
    except argparse.ArgumentTypeError as exc:
        print(f"san: --controller: {exc}", file=sys.stderr)
        return 2
    if not controllers or not args.suspend_timeout > 0 or args.max_connections < 1 or args.max_connections_per_address < 1:
        print("san: --controller needs HOST:PORT; --suspend-timeout and the connection limits must be positive", file=sys.stderr)
        return 2
    options = GatewayOptions(
        args.name,
        controllers,
        args.cluster,
        [p for p in (args.portal or [("0.0.0.0", 3260)]) if p != ("", 0)],
        args.iqn,
        args.frontend,
        args.suspend_timeout,
        Limits(args.max_connections, args.max_connections_per_address),
        args.storage,
        args.controller_name,
        args.direct_io,
        args.metrics if args.metrics != ("", 0) else None,
        args.metrics_cert,
        args.metrics_key,
        args.metrics_token_file,
    )
    return run_loop(gateway(options))


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the service on uvloop when it is installed (a faster event loop), else on asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_serve(args: argparse.Namespace) -> int:
    from san.iscsi.server import Limits
    from san.serve import Options, serve

    _log_to_stderr(args.log_level)
    if args.max_connections < 1 or args.max_connections_per_address < 1:
        print("san: --max-connections and --max-connections-per-address must be at least 1", file=sys.stderr)
        return 2
    options = Options(
        args.data,
        args.listen,
        args.commit_interval,
        [p for p in (args.portal or [("0.0.0.0", 3260)]) if p != ("", 0)],
        args.iqn,
        args.open_access,
        args.frontend,
        tuple(args.allow_path),
        args.api_cert,
        args.api_key,
        args.api_token_file,
        Limits(args.max_connections, args.max_connections_per_address),
        args.metrics == "on",
    )
    return run_loop(serve(options))


def run_demo(args: argparse.Namespace) -> int:
    from san.demo import demo

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_loop(demo(args.data, args.listen, args.portal, args.iqn, args.size))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return run_serve(args)
        if args.command == "demo":
            return run_demo(args)
        if args.command == "check":
            return run_check(args.data)
        if args.command == "cluster":
            return run_cluster(args)
        if args.command == "controller":
            return run_controller(args)
        if args.command == "gateway":
            return run_gateway(args)
        return run_client(args)
    except ApiError as exc:
        print(f"san: {plain(exc)}", file=sys.stderr)
        for line in getattr(exc, "lines", ()):  # a refused import: one line per conflict
            print(plain(line), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
