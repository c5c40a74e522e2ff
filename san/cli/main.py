"""The `san` command: `serve` and `check` work on a data directory; the rest are clients of the API (commands.py).

Every error prints one line on stderr and exits 1; --json prints the API's JSON unchanged. Secrets are read from
files, stdin or a prompt, never from the command line (where ps shows them)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

from san.cli.commands import run_client
from san.cli.output import plain
from san.cli.parser import _hostport, build_parser
from san.client import ApiError


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
    except BrokenPipeError:  # `san vdisk list | head -1`: the reader has gone, and that is no error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail again
        return 0


if __name__ == "__main__":
    sys.exit(main())
