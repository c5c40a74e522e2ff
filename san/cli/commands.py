"""The CLI's client commands: status, pool, vdisk, host, zone, config and top, each through the typed client.

Every refusal is an ApiError with the server's one line; --json prints the API's JSON unchanged."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Sequence

from san.cli import columns, views
from san.cli.output import plain, progress
from san.client import ApiError, Pool, SanClient, VDisk
from san.units import format_exact


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


def _host_changes(args: argparse.Namespace) -> dict[str, str]:
    """What host modify changes: only what was given (secrets from files, stdin or a prompt)."""
    changes: dict[str, str] = {}
    if args.iqn is not None:
        changes["iqn"] = args.iqn
    if args.no_chap:
        if args.chap_user or args.mutual_user or args.chap_secret_file or args.mutual_secret_file:
            raise ApiError("--no-chap removes CHAP: give no CHAP user or secret with it")
        changes["chap_user"] = ""
        return changes
    if args.chap_secret_file == "-" and args.mutual_secret_file == "-":
        raise ApiError("only one secret can come from stdin: give the other in a file")
    for user_key, secret_key, user, path, what in (
        ("chap_user", "chap_secret", args.chap_user, args.chap_secret_file, "chap secret"),
        ("mutual_user", "mutual_secret", args.mutual_user, args.mutual_secret_file, "mutual secret"),
    ):
        if user is not None:
            changes[user_key] = user
        if path is not None:
            changes[secret_key] = _read_secret(path, what)
        elif user:
            changes[secret_key] = _ask_secret(what)
    if not changes:
        raise ApiError(
            "nothing to change: give --iqn, --chap-user, --chap-secret-file, --mutual-user, --mutual-secret-file or --no-chap"
        )
    return changes


def _run_zoning(client: SanClient, args: argparse.Namespace) -> int:
    if args.command == "host":
        if args.action == "create":
            host = client.create_host(args.name, args.iqn, args.chap_user, mutual_user=args.mutual_user, **_secrets(args))
            print(f"host {plain(host.name)} created for {plain(host.iqn)}")
            for warning in host.warnings or []:
                print(f"san: warning: {plain(warning)}", file=sys.stderr)
        elif args.action == "list":
            hosts = client.hosts()
            views.print_json(hosts) if args.json else print(views.host_rows(hosts))
        elif args.action == "show":
            shown = client.host(args.name)
            views.print_json(shown) if args.json else print(views.show_host(shown))
        elif args.action == "modify":
            host = client.modify_host(args.name, **_host_changes(args))
            print(f"host {plain(host.name)} modified: {plain(host.iqn)}, {views.chap_of(host)}")
        elif args.action == "delete":
            client.delete_host(args.name)
            print(f"host {args.name} deleted")
        return 0
    if args.action == "add":
        zone = client.add_zone(args.host, args.vdisk, args.lun, args.read_only)
        access = "read-only" if zone.read_only else "read-write"
        print(f"host {zone.host} sees {zone.vdisk} as LUN {zone.lun} ({access})")
    elif args.action == "modify":
        if args.lun is None and args.read_only is None:
            raise ApiError("give --lun, --read-only or --read-write")
        zone = client.modify_zone(args.host, args.vdisk, args.lun, args.read_only)
        access = "read-only" if zone.read_only else "read-write"
        print(f"host {zone.host} sees {zone.vdisk} as LUN {zone.lun} ({access})")
    elif args.action == "remove":
        client.remove_zone(args.host, args.vdisk)
        print(f"host {args.host} no longer sees {args.vdisk}")
    elif args.action == "list":
        zones = client.zones()
        views.print_json(zones) if args.json else print(views.zone_rows(zones))
    return 0


def _run_config(client: SanClient, args: argparse.Namespace) -> int:
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


def _wait_thick(client: SanClient, vdisk: VDisk) -> VDisk:
    label = f"allocating {vdisk.name}"
    while vdisk.state == "allocating":
        progress(vdisk.progress, label)
        time.sleep(0.2)
        vdisk = client.vdisk(vdisk.name)
    progress(1.0, label)
    return vdisk


def _listing(items: Sequence[Pool | VDisk], specs: dict[str, columns.Column], default: Sequence[str],
             args: argparse.Namespace) -> str:  # fmt: skip
    try:
        names = columns.chosen(args.options, specs, default)
    except ValueError as exc:
        raise ApiError(f"-o: {exc}") from None
    return columns.render(items, specs, names, args)


def _run_pool(client: SanClient, args: argparse.Namespace) -> int:
    if args.action == "create":
        path = os.path.abspath(args.path) if args.path else None
        pool = client.create_pool(args.name, args.size, path, args.existing, args.segment_size, args.warn_percent,
                                  args.allocate_ahead)  # fmt: skip
        print(f"pool {pool.name} created: {format_exact(pool.capacity_bytes)} in {format_exact(pool.segment_size)} segments")
    elif args.action == "list":
        pools = client.pools()
        views.print_json(pools) if args.json else print(_listing(pools, columns.POOL_COLUMNS, columns.POOL_DEFAULT, args))
    elif args.action == "show":
        shown = client.pool(args.name)
        views.print_json(shown) if args.json else print(views.show_pool(shown))
    elif args.action == "delete":
        client.delete_pool(args.name)
        print(f"pool {args.name} deleted")
    return 0


def _run_vdisk(client: SanClient, args: argparse.Namespace) -> int:
    if args.action == "create":
        vdisk = client.create_vdisk(args.name, args.pool, args.size, args.thick, args.block_size)
        if vdisk.state == "allocating":
            vdisk = _wait_thick(client, vdisk)
        kind = "thin" if vdisk.thin else "thick"
        print(f"vdisk {vdisk.name} created: {format_exact(vdisk.size_bytes)} {kind} in pool {vdisk.pool}")
    elif args.action == "list":
        vdisks = client.vdisks()
        views.print_json(vdisks) if args.json else print(_listing(vdisks, columns.VDISK_COLUMNS, columns.VDISK_DEFAULT, args))
    elif args.action == "show":
        shown = client.vdisk(args.name)
        views.print_json(shown) if args.json else print(views.show_vdisk(shown))
    elif args.action == "rename":
        vdisk = client.rename_vdisk(args.name, args.new_name)
        print(f"vdisk {args.name} renamed {vdisk.name}")
    elif args.action == "grow":
        vdisk = client.grow_vdisk(args.name, args.size)
        print(f"vdisk {vdisk.name} grown to {format_exact(vdisk.size_bytes)}")
    elif args.action == "delete":
        client.delete_vdisk(args.name)
        print(f"vdisk {args.name} deleted")
    return 0


def _run_snapshot(client: SanClient, args: argparse.Namespace) -> int:
    if args.action == "create":
        snapshot = client.create_snapshot(args.vdisk, args.name)
        print(f"snapshot {snapshot.name} taken: {format_exact(snapshot.size_bytes)}, read-only")
    elif args.action == "list":
        snapshots = client.snapshots(args.vdisk)
        views.print_json(snapshots) if args.json else print(views.snapshot_rows(snapshots))
    elif args.action == "show":
        shown = client.vdisk(_snapshot_name(args.name))
        views.print_json(shown) if args.json else print(views.show_vdisk(shown))
    elif args.action == "delete":
        vdisk, name = _snapshot_name(args.name).split("@", 1)
        client.delete_snapshot(vdisk, name)
        print(f"snapshot {args.name} deleted")
    return 0


def _snapshot_name(name: str) -> str:
    vdisk, at, snapshot = name.partition("@")
    if not at or not vdisk or not snapshot:
        raise ApiError(f"{name!r} is not a snapshot name (VDISK@NAME)")
    return name


def run_client(args: argparse.Namespace) -> int:
    client = SanClient(args.api, args.token_file, args.ca_file)
    if args.command == "config":
        return _run_config(client, args)
    if args.command == "top":
        from san.cli.top import top

        if not args.interval > 0 or (args.count is not None and args.count < 1):
            raise ApiError("--interval must be positive and --count at least 1")
        gateways = [SanClient(url, args.gateway_token_file, args.ca_file) for url in args.gateway]
        return top([client, *gateways], args.interval, args.count)
    if args.command == "status":
        status = client.status()
        views.print_json(status) if args.json else print(views.show_status(status))
        return 0
    if args.command == "session":
        sessions = client.sessions()
        views.print_json(sessions) if args.json else print(views.session_rows(sessions))
        return 0
    if args.command == "pool":
        return _run_pool(client, args)
    if args.command in ("host", "zone"):
        return _run_zoning(client, args)
    if args.command == "snapshot":
        return _run_snapshot(client, args)
    return _run_vdisk(client, args)
