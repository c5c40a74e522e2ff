"""`san status` and `san session list` against a real initiator logged in: on `san serve` (gateway local) and on a
gateway in its own process (the session reaches the controller with the gateway's heartbeat)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import ClusterServer, SanServer, running_server
from rawiscsi import RawInitiator

TARGET = "iqn.2003-01.org.san:status"
INITIATOR = "iqn.2024-01.org.example:status"


def _zone(san: SanServer) -> None:
    san.ok("pool", "create", "p", "--size", "64M")
    san.ok("vdisk", "create", "v", "--pool", "p", "--size", "8M")
    san.ok("host", "create", "h", "--iqn", INITIATOR)
    san.ok("zone", "add", "h", "v", "--lun", "3")


def _until(check: Callable[[], Any], seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := check()):
        assert time.monotonic() < deadline, "not seen in time"
        time.sleep(0.2)
    return found


def _check_session(san: SanServer, gateway: str, initiator: RawInitiator) -> None:
    local_port = initiator.sock.getsockname()[1]
    sessions = _until(lambda: json.loads(san.ok("session", "list", "--json")))
    assert len(sessions) == 1
    session = sessions[0]
    assert (session["initiator"], session["host"], session["gateway"], session["luns"]) == (INITIATOR, "h", gateway, [3])
    assert session["address"] == f"127.0.0.1:{local_port}"
    assert session["header_digest"] is False and session["data_digest"] is False
    table = san.ok("session", "list").splitlines()
    assert table[0].split() == ["INITIATOR", "HOST", "ADDRESS", "DIGESTS", "LUNS", "GATEWAY", "TSIH"]
    assert table[1].split()[:6] == [INITIATOR, "h", f"127.0.0.1:{local_port}", "none", "3", gateway]


def test_status_and_sessions_on_san_serve(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", tmp_path / "cwd", "--iqn", TARGET) as san:
        _zone(san)
        initiator = RawInitiator(san.iscsi_port, INITIATOR)
        try:
            initiator.login(TARGET)
            _check_session(san, "local", initiator)
            status = json.loads(san.ok("status", "--json"))
            assert (status["target"], status["frontend"], status["portals"]) == (TARGET, "iscsi", [f"127.0.0.1:{san.iscsi_port}"])
            assert (status["gateways"], status["sessions"], status["hosts"], status["zones"]) == (["local"], 1, 1, 1)
            shown = san.ok("status")
            for line in (f"target:   {TARGET}", "frontend: iscsi", f"portals:  127.0.0.1:{san.iscsi_port}", "sessions: 1"):
                assert line in shown, shown
        finally:
            initiator.close()
        _until(lambda: json.loads(san.ok("session", "list", "--json")) == [])
        assert san.stop() == 0


def test_sessions_through_a_gateway_reach_the_controller(tmp_path: Path) -> None:
    cluster = ClusterServer(tmp_path / "data", tmp_path / "cwd", TARGET)
    cluster.start()
    try:
        _zone(cluster)
        initiator = RawInitiator(cluster.iscsi_port, INITIATOR)
        try:
            initiator.login(TARGET)
            _check_session(cluster, "gw1", initiator)
            status = json.loads(cluster.ok("status", "--json"))
            assert status["target"] is None and status["gateways"] == ["gw1"] and status["sessions"] == 1
        finally:
            initiator.close()
    finally:
        assert cluster.stop() == 0, cluster.log_text()
