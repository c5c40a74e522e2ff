"""`san-shell`: the interactive shell, or one command given on its command line, as targetcli does it
(`san-shell /vdisks create name=vm1 pool=fast size=40G`). Before every command the tree is read again from the API.

Options before the command: --api URL, --token-file FILE, --ca-file FILE (or SAN_API, SAN_TOKEN_FILE, SAN_CA_FILE)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

try:
    from configshell_fb import ConfigShell, ExecutionError

    from san.client import DEFAULT_API, ApiError, SanClient
except ImportError as missing:  # san-shell installed alone: say what it needs, in one line
    sys.exit(f"san-shell: {missing}: install configshell-fb and the san package (pip install SAN_SOURCE ./targetcli-ext)")

from san_shell.nodes import SanTree


class SanShell(ConfigShell):  # type: ignore[misc]
    """A ConfigShell whose tree is brought in line with the API before each command line it runs."""

    def run_cmdline(self, cmdline: str) -> None:
        root = self._root_node
        if cmdline and isinstance(root, SanTree):
            root.refresh()
        super().run_cmdline(cmdline)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="san-shell", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", default=os.environ.get("SAN_API", DEFAULT_API), help="management API URL (default %(default)s)")
    parser.add_argument("--token-file", default=os.environ.get("SAN_TOKEN_FILE"), help="file holding the API token")
    parser.add_argument("--ca-file", default=os.environ.get("SAN_CA_FILE"), help="CA certificate for an https API")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="one command to run, then exit (default: the shell)")
    args = parser.parse_args(argv)
    return args, args.command


def build(client: SanClient, preferences: str = "~/.san-shell") -> tuple[SanShell, SanTree]:
    shell = SanShell(os.path.expanduser(preferences))
    root = SanTree("/", None, client, shell=shell)
    root.refresh()
    return shell, root


def main(argv: list[str] | None = None) -> int:
    args, command = parse(sys.argv[1:] if argv is None else argv)
    try:
        client = SanClient(args.api, args.token_file, args.ca_file)
        shell, _ = build(client)
    except (ApiError, ExecutionError) as exc:
        print(f"san-shell: {exc}", file=sys.stderr)
        return 1
    if command:
        return run_once(shell, " ".join(command))
    shell.con.display("san-shell: san's pools, vdisks, hosts and gateways. For help on commands, type 'help'.\n")
    while not shell._exit:
        try:
            shell.run_interactive()
        except (ApiError, ExecutionError) as exc:
            shell.log.error(str(exc))
    return 0


def run_once(shell: Any, line: str) -> int:
    """One command line: 0, or 1 with the error on stderr."""
    try:
        shell.run_cmdline(line)
    except (ApiError, ExecutionError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
