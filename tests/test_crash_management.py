"""Crash safety of management: `san serve` is killed with SIGKILL while clients create and delete pools (new
labelled files, and a loop device), vdisks (thin and thick), hosts and zones, and grow vdisks. After every kill
`san check` must be clean and the server must start again on the store; what a client was told succeeded must be
there, and what it was told failed must not.

Each round runs a random mix from a seeded generator, so a failure can be replayed."""

from __future__ import annotations

import http.client
import random
import threading
from pathlib import Path
from typing import Any

from conftest import SanServer, assert_clean

ROUNDS = 12
UNANSWERED = -1
SIZES = ["8M", "16M", "24M"]


class Client:
    """Random management operations until the server dies; remembers what it was told."""

    def __init__(self, server: SanServer, rng: random.Random, files: Path) -> None:
        self.server = server
        self.rng = rng
        self.files = files
        self.done: list[tuple[str, str, int]] = []  # (operation, name, status)
        self.asking: tuple[str, str] | None = None  # the operation sent and not answered yet

    def call(self, operation: str, name: str, method: str, path: str, body: Any = None) -> None:
        self.asking = (operation, name)
        status, _ = self.server.http(method, path, body, timeout=30)
        self.asking = None
        self.done.append((operation, name, status))

    def step(self, n: int) -> None:
        rng = self.rng
        pools = [p["name"] for p in self.server.get("/pools")]
        vdisks = [v["name"] for v in self.server.get("/vdisks") if v["state"] == "ready"]
        hosts = [h["name"] for h in self.server.get("/hosts")]
        zones = [(z["host"], z["vdisk"]) for z in self.server.get("/zones")]
        choice = rng.random()
        if choice < 0.2 or not pools:
            name = f"p{n}"
            body: dict[str, Any] = {"name": name, "size": rng.choice(SIZES), "segment_size": rng.choice(["64K", "1M"])}
            if rng.random() < 0.3:
                body["path"] = str(self.files / f"{name}.img")
            self.call("pool", name, "POST", "/pools", body)
        elif choice < 0.4:
            name = f"v{n}"
            body = {"name": name, "pool": rng.choice(pools), "size": rng.choice(["1M", "3M", "5M"]), "thick": rng.random() < 0.5}
            self.call("vdisk", name, "POST", "/vdisks", body)
        elif choice < 0.5 and vdisks:
            name = rng.choice(vdisks)
            self.call("grow", name, "POST", f"/vdisks/{name}/grow", {"size": "6M"})
        elif choice < 0.6:
            name = f"h{n}"
            self.call("host", name, "POST", "/hosts", {"name": name, "iqn": f"iqn.2024-01.org.example:h{n}"})
        elif choice < 0.75 and hosts and vdisks:
            host, vdisk = rng.choice(hosts), rng.choice(vdisks)
            self.call("zone", f"{host}/{vdisk}", "POST", "/zones", {"host": host, "vdisk": vdisk})
        elif choice < 0.85 and zones:
            host, vdisk = rng.choice(zones)
            self.call("unzone", f"{host}/{vdisk}", "DELETE", f"/zones/{host}/{vdisk}")
        elif choice < 0.93 and vdisks:
            name = rng.choice(vdisks)
            self.call("vdisk-delete", name, "DELETE", f"/vdisks/{name}")
        elif pools:
            name = rng.choice(pools)
            self.call("pool-delete", name, "DELETE", f"/pools/{name}")

    def run(self, start: int) -> int:
        n = start
        try:
            while True:
                n += 1
                self.step(n)
        except (OSError, AssertionError, http.client.HTTPException):
            if self.asking is not None:  # killed before it answered: done or not, either is right
                self.done.append((*self.asking, UNANSWERED))
            return n  # the server was killed, perhaps in the middle of an answer


def agreed(server: SanServer, done: list[tuple[str, str, int]]) -> None:
    """What the client was told succeeded before the kill is there; a delete it was told succeeded is gone."""
    pools = {p["name"] for p in server.get("/pools")}
    vdisks = {v["name"] for v in server.get("/vdisks")}
    hosts = {h["name"] for h in server.get("/hosts")}
    zones = {f"{z['host']}/{z['vdisk']}" for z in server.get("/zones")}
    final: dict[tuple[str, str], str] = {}
    for operation, name, status in done:
        kind = {"pool": "pool", "pool-delete": "pool", "vdisk": "vdisk", "vdisk-delete": "vdisk", "host": "host",
                "zone": "zone", "unzone": "zone"}.get(operation)  # fmt: skip
        if kind is not None and status == UNANSWERED:
            final.pop((kind, name), None)  # asked when it was killed: it may or may not have happened
            continue
        if kind is None or status >= 300:
            continue
        final[(kind, name)] = "gone" if operation in ("pool-delete", "vdisk-delete", "unzone") else "there"
    present = {"pool": pools, "vdisk": vdisks, "host": hosts, "zone": zones}
    for (kind, name), state in final.items():
        assert (name in present[kind]) == (state == "there"), (kind, name, state, sorted(present[kind]))


def test_sigkill_during_management_leaves_a_clean_store(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    server = SanServer(tmp_path / "data", tmp_path / "cwd", extra=("--allow-path", str(files), "--portal", "none"))
    rng = random.Random(20261201)
    n = 0
    steps = 0
    try:
        for _ in range(ROUNDS):
            server.start()
            client = Client(server, rng, files)
            killer = threading.Timer(rng.uniform(0.3, 2.5), server.kill)
            killer.start()
            n = client.run(n)
            killer.join()
            steps += len(client.done)
            assert not server.running
            assert_clean(server.data)
            server.start()
            agreed(server, client.done)  # every answer it got was given after its commit
            assert "Traceback" not in server.log_text()
            server.kill()
        assert steps > ROUNDS * 5, f"only {steps} operations ran"
        server.start()
        assert server.stop() == 0
        assert_clean(server.data)
    finally:
        server.kill()
