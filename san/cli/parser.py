"""The `san` command line: every subcommand, option and default, and the argument types that check them.

argparse errors are one line (`san: <what is wrong>`, status 2); secrets are refused on the command line."""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any, NoReturn

import san
from san.cli import columns
from san.cli.output import plain
from san.client import DEFAULT_API
from san.units import parse_size


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.01 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is not between 0.01 and 3600 seconds")
    return value


def _iscsi_name(text: str) -> str:
    from san.controller.zoning import check_iscsi_name
    from san.errors import InvalidRequest

    try:
        check_iscsi_name(text)
    except InvalidRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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
    parser.add_argument("--version", action="version", version=f"san {san.__version__}")
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
    serve.add_argument(
        "--commit-interval", type=_interval, default=1.0, help="seconds between metadata commits, 0.01-3600 (default %(default)s)"
    )
    serve.add_argument(
        "--portal",
        action="append",
        type=_hostport,
        help="HOST:PORT for iSCSI (repeatable; default 0.0.0.0:3260); --portal none serves no iSCSI",
    )
    serve.add_argument("--iqn", type=_iscsi_name, default=default_iqn(), help="the target's iSCSI name (default %(default)s)")
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
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what to log on stderr (default %(default)s)",
    )

    demo = commands.add_parser("demo", help="serve a demo thin vdisk that every initiator may use (demo mode)")
    demo.add_argument("--data", required=True, help="data directory (created if missing)")
    demo.add_argument(
        "--api", dest="listen", type=_hostport, default=("127.0.0.1", 8080), help="HOST:PORT for the API (default 127.0.0.1:8080)"
    )
    demo.add_argument(
        "--portal", type=_hostport, default=("127.0.0.1", 3260), help="HOST:PORT for iSCSI (default 127.0.0.1:3260)"
    )
    demo.add_argument("--iqn", type=_iscsi_name, default=default_iqn(), help="the target's iSCSI name (default %(default)s)")
    demo.add_argument("--size", type=_size_arg, default="10G", help="size of the demo vdisk (default 10G)")

    check = commands.add_parser("check", help="check a data directory's store offline (exit 1 on damage)")
    check.add_argument("--data", required=True, help="data directory")

    role = commands.add_parser("controller", help="run the controller alone: store, management API, listener for gateways")
    role.add_argument("--data", required=True, help="data directory (store, default pool files; mode 0700)")
    role.add_argument("--listen", required=True, type=_hostport, help="HOST:PORT to listen for gateways on (mutual TLS)")
    role.add_argument("--cluster", required=True, help="the cluster directory (san cluster init)")
    role.add_argument("--name", default="controller", help="this node's name in the cluster (default %(default)s)")
    role.add_argument(
        "--api",
        dest="listen_api",
        type=_hostport,
        default=("127.0.0.1", 8080),
        help="HOST:PORT for the management API (default 127.0.0.1:8080)",
    )
    role.add_argument("--api-cert", help="TLS certificate (PEM) for the API")
    role.add_argument("--api-key", help="TLS private key (PEM) for the API")
    role.add_argument("--api-token-file", help="file (mode 0600) holding the API token (default: DATA/api-token)")
    role.add_argument("--lease", type=float, default=10.0, help="seconds a gateway's lease lasts without renewal (default 10)")
    role.add_argument(
        "--commit-interval", type=_interval, default=1.0, help="seconds between metadata commits, 0.01-3600 (default %(default)s)"
    )
    role.add_argument("--allow-path", action="append", default=[], metavar="DIR", help="as for san serve")
    role.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what to log on stderr (default %(default)s)",
    )

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
        "--iqn",
        type=_iscsi_name,
        default=default_iqn(),
        help="the target's iSCSI name, the same on every gateway (default %(default)s)",
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
    role.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what to log on stderr (default %(default)s)",
    )

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
    status.add_argument("--json", action="store_true", help="print the API's JSON unchanged")

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

    session = commands.add_parser("session", help="the iSCSI sessions on every gateway").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    listing = session.add_parser("list", parents=[client], help="initiator, address, digests, LUNs and gateway of each")
    listing.add_argument("--json", action="store_true", help="print the API's JSON unchanged")

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
    top.add_argument(
        "--gateway-token-file",
        help="the gateways' metrics token (their CLUSTER/metrics-token; default: the one published for each URL, as root)",
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
    create.add_argument(
        "--warn-percent", type=int, default=80, help="fullness (%%) that raises the threshold warning (default %(default)s)"
    )
    create.add_argument(
        "--allocate-ahead", type=int, default=4, help="extra segments allocated for sequential writers (default %(default)s)"
    )
    listing = pool.add_parser("list", parents=[client], help="list pools, like lvs (-o, --units, --noheadings)")
    listing.add_argument("--json", action="store_true", help="print the API's JSON unchanged")
    columns.add_options(listing, columns.POOL_COLUMNS, columns.POOL_DEFAULT)
    show = pool.add_parser("show", parents=[client], help="show one pool")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print the API's JSON unchanged")
    pool.add_parser("delete", parents=[client], help="delete an empty pool (files san created are removed)").add_argument("name")

    vdisk = commands.add_parser("vdisk", help="manage virtual disks").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = vdisk.add_parser("create", parents=[client], help="create a vdisk (thin unless --thick)")
    create.add_argument("name")
    create.add_argument("--pool", required=True, help="the pool its segments come from")
    create.add_argument("--size", type=_size_arg, required=True, help="size, e.g. 10G")
    create.add_argument("--thick", action="store_true", help="allocate every segment now")
    create.add_argument(
        "--block-size", type=int, choices=[512, 4096], default=512, help="logical block size in bytes (default %(default)s)"
    )
    listing = vdisk.add_parser("list", parents=[client], help="list vdisks, like lvs (-o, --units, --noheadings)")
    listing.add_argument("--json", action="store_true", help="print the API's JSON unchanged")
    columns.add_options(listing, columns.VDISK_COLUMNS, columns.VDISK_DEFAULT)
    show = vdisk.add_parser("show", parents=[client], help="show one vdisk")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print the API's JSON unchanged")
    rename = vdisk.add_parser("rename", parents=[client], help="give a vdisk another name (hosts see the same LUN)")
    rename.add_argument("name")
    rename.add_argument("new_name", metavar="NEW_NAME")
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
    host.add_parser("list", parents=[client], help="list hosts").add_argument(
        "--json", action="store_true", help="print the API's JSON unchanged"
    )
    show = host.add_parser("show", parents=[client], help="show one host and its LUNs")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print the API's JSON unchanged")
    modify = host.add_parser("modify", parents=[client], help="change a host's iSCSI name or CHAP credentials (zones kept)")
    modify.add_argument("name")
    modify.add_argument("--iqn", type=_iscsi_name, help="its new iSCSI name")
    modify.add_argument("--chap-user", help="a new CHAP user (its secret is asked for unless --chap-secret-file)")
    modify.add_argument("--chap-secret-file", metavar="FILE", help="file holding a new CHAP secret, - for stdin")
    modify.add_argument("--mutual-user", help="a new mutual CHAP user (its secret is asked for unless --mutual-secret-file)")
    modify.add_argument("--mutual-secret-file", metavar="FILE", help="file holding a new mutual CHAP secret, - for stdin")
    modify.add_argument(
        "--no-chap", action="store_true", help="remove CHAP (and mutual CHAP): any initiator with its name logs in"
    )
    modify.add_argument("--chap-secret", nargs="?", action=SecretOnCommandLine, help=argparse.SUPPRESS)
    modify.add_argument("--mutual-secret", nargs="?", action=SecretOnCommandLine, help=argparse.SUPPRESS)
    host.add_parser("delete", parents=[client], help="delete a host with no zones").add_argument("name")

    snapshot = commands.add_parser("snapshot", help="manage snapshots (VDISK@NAME: read-only, point in time)").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = snapshot.add_parser(
        "create", parents=[client], help="snapshot a vdisk: every write acknowledged before is in it, none after"
    )
    create.add_argument("vdisk")
    create.add_argument("name", help="the snapshot's name: it is VDISK@NAME from then on")
    listing = snapshot.add_parser("list", parents=[client], help="list snapshots, oldest first")
    listing.add_argument("vdisk", nargs="?", help="only this vdisk's (default: every vdisk's)")
    listing.add_argument("--json", action="store_true", help="print the API's JSON unchanged")
    show = snapshot.add_parser("show", parents=[client], help="show one snapshot")
    show.add_argument("name", metavar="VDISK@NAME")
    show.add_argument("--json", action="store_true", help="print the API's JSON unchanged")
    snapshot.add_parser(
        "delete", parents=[client], help="delete a snapshot (not zoned); what only it kept is reclaimed in the background"
    ).add_argument("name", metavar="VDISK@NAME")

    zone = commands.add_parser("zone", help="manage zoning: which host sees which vdisk").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    add = zone.add_parser("add", parents=[client], help="let a host see a vdisk")
    add.add_argument("host")
    add.add_argument("vdisk")
    add.add_argument("--lun", type=int, help="LUN number (default: the lowest free one)")
    add.add_argument("--read-only", action="store_true", help="the host may only read")
    modify = zone.add_parser("modify", parents=[client], help="move a zone to another LUN, or change its access")
    modify.add_argument("host")
    modify.add_argument("vdisk")
    modify.add_argument("--lun", type=int, help="its new LUN number")
    access = modify.add_mutually_exclusive_group()
    access.add_argument("--read-only", dest="read_only", action="store_true", default=None, help="the host may only read")
    access.add_argument("--read-write", dest="read_only", action="store_false", help="the host may read and write")
    remove = zone.add_parser("remove", parents=[client], help="stop a host seeing a vdisk")
    remove.add_argument("host")
    remove.add_argument("vdisk")
    zone.add_parser("list", parents=[client], help="list zones").add_argument(
        "--json", action="store_true", help="print the API's JSON unchanged"
    )
    return parser
