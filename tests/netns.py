"""Separate hosts on one machine: network namespaces on a bridge, with addresses in 198.18.0.0/15 (made here and
removed by close()). Each namespace has one veth into the bridge; the root namespace reaches all of them."""

from __future__ import annotations

import itertools
import os
import subprocess

_NETS = itertools.count()


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Net:
    """Namespaces named for roles; addr(role) is its address; exec(role) prefixes a command to run there."""

    def __init__(self, roles: list[str]) -> None:
        serial = next(_NETS)
        self.tag = f"{(os.getpid() * 7 + serial) % 10000:04d}"  # names differ per Net: a deleted one may linger
        self.subnet = f"198.18.{(os.getpid() + serial) % 200 + 20}"
        self.bridge = f"sanbr{self.tag}"
        self.roles = roles
        self.made: list[str] = []
        self.links: list[str] = []
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for index, role in enumerate(roles):
                ns, outer = self.ns(role), f"sv{self.tag}{index}"
                ip("netns", "add", ns)
                self.made.append(ns)
                ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
                self.links.append(outer)
                ip("link", "set", outer, "master", self.bridge)
                ip("link", "set", outer, "up")
                ip("-n", ns, "addr", "add", f"{self.addr(role)}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
                ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def ns(self, role: str) -> str:
        return f"san{self.tag}{role}"

    def addr(self, role: str) -> str:
        return f"{self.subnet}.{10 + self.roles.index(role)}"

    def exec(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role)]

    def down(self, role: str) -> None:
        ip("-n", self.ns(role), "link", "set", "eth0", "down")

    def up(self, role: str) -> None:
        ip("-n", self.ns(role), "link", "set", "eth0", "up")

    def close(self) -> None:
        for outer in self.links:  # at once: a namespace's own links go only when the kernel gets round to it
            subprocess.run(["ip", "link", "del", outer], capture_output=True, check=False)
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        self.made, self.links = [], []
