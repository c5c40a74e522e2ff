"""user:san on D-Bus: san's org.kernel.TCMUService1 on a private system bus (Debian's default policy plus san's file),
read by stock targetcli's own code (its backstore lister and CheckConfig call, in Debian's python3 with gi)."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from san.lio import cfgstring
from san.lio.dbus import TcmuService
from san.service import Service

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "systemd" / "san-dbus.conf"
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""
# What targetcli does for /backstores (ui_backstore.UIBackstores._user_backstores) and for `create` (CheckConfig)
TARGETCLI = """
import json, sys
from gi.repository import Gio
from targetcli.ui_backstore import UIBackstores
bus = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
names = bus.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "ListNames", None,
                      None, Gio.DBusCallFlags.NONE, -1, None).unpack()[0]
found = {}
for name, iface, props in UIBackstores._user_backstores(None):
    desc = props.get("org.kernel.TCMUService1", {}).get("ConfigDesc")
    found[name] = {"desc": desc, "checks": [list(iface.CheckConfig("(s)", c)) for c in sys.argv[1:]]}
print(json.dumps({"on_bus": "org.kernel.TCMUService1" in names, "backstores": found}))
"""


@pytest.fixture
def system_bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A dbus-daemon of type system on a socket of its own (which any user can reach), used by this process and its
    children."""
    assert shutil.which("dbus-daemon"), "dbus-daemon is missing: `make test` installs dbus"
    run = Path(tempfile.mkdtemp(prefix="san-bus-"))
    run.chmod(0o755)
    socket = run / "system_bus_socket"
    config = tmp_path / "system.conf"
    config.write_text(BUS_CONFIG.format(socket=socket, policy=POLICY))
    daemon = subprocess.Popen(["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={config}"])
    try:
        for _ in range(500):
            if socket.exists():
                break
            assert daemon.poll() is None, "dbus-daemon did not start"
            subprocess.run(["sleep", "0.01"], check=True)
        address = f"unix:path={socket}"
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
        yield address
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        shutil.rmtree(run)


async def targetcli_sees(*configs: str, user: str | None = None) -> dict[str, object]:
    """Whether the name is on the bus, and the user backstores targetcli lists, with their ConfigDesc and
    CheckConfig's answer for each config."""
    assert Path("/usr/lib/python3/dist-packages/targetcli").is_dir(), "`make test` installs targetcli-fb"
    command = ["/usr/bin/python3", "-c", TARGETCLI, *configs]
    if user is not None:
        entry = pwd.getpwnam(user)
        command = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", *command]
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, env=dict(os.environ))
    stdout, _ = await process.communicate()
    assert process.returncode == 0
    result: dict[str, object] = json.loads(stdout)
    return result


def only_fast(config: str) -> str | None:
    """A neighbour that knows one pool, as the controller would answer."""
    pool = cfgstring.parse(config).pool
    return None if pool == "fast" else f"no pool named {pool!r}"


def test_targetcli_lists_user_san_and_its_check_refuses_bad_cfgstrings(system_bus: str) -> None:
    """targetcli lists user:san with san's cfgstring help; CheckConfig accepts pool=fast and refuses a missing pool,
    an unknown key, a malformed string and another handler's config, each with its reason."""

    async def scenario() -> dict[str, object]:
        service = TcmuService(only_fast)
        assert await service.start(), service.refusal
        try:
            return await targetcli_sees("san/pool=fast", "san/pool=slow", "san/size=1G", "san/fast", "rbd/pool/img")
        finally:
            await service.stop()

    seen = asyncio.run(scenario())
    backstores = seen["backstores"]
    assert isinstance(backstores, dict) and list(backstores) == ["san"], seen
    assert backstores["san"]["desc"] == cfgstring.DESCRIPTION
    assert backstores["san"]["checks"] == [
        [True, ""],
        [False, "no pool named 'slow'"],
        [False, "unknown key 'size'; the keys are pool, vdisk, serial"],
        [False, "'fast' is not key=value; give pool=<pool>"],
        [False, "'rbd/pool/img' is not for handler san (san/<cfgstring>)"],
    ]


def test_only_root_may_ask_and_the_name_is_held_once(system_bus: str) -> None:
    """Another user's targetcli gets nothing from san (the policy lets only root ask); a second san (or tcmu-runner)
    cannot take the name and says so; with no bus at all san says why targetcli will not list user:san."""

    async def scenario() -> None:
        first = TcmuService(only_fast)
        assert await first.start()
        try:
            assert await targetcli_sees("san/pool=fast", user="nobody") == {"on_bus": True, "backstores": {}}
            second = TcmuService(only_fast)
            assert not await second.start()
            assert second.refusal is not None and "is owned by another process" in second.refusal
        finally:
            await first.stop()
        after = TcmuService(only_fast)
        assert await after.start(), "the name is free again once the first has stopped"
        await after.stop()

    asyncio.run(scenario())


def test_no_system_bus_is_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path / 'none'}")
    service = TcmuService(only_fast)
    assert not asyncio.run(service.start())
    assert service.refusal is not None and service.refusal.startswith("no D-Bus system bus")


def test_cfgstring_check_asks_the_controller(tmp_path: Path) -> None:
    """san serve's check: the pool must exist and be online, a bound vdisk must exist with that serial; the grammar
    (no commas: the kernel would cut dev_config there) is refused before the controller is asked."""

    async def scenario() -> list[str | None]:
        service = Service(str(tmp_path / "data"))
        await service.start()
        try:
            await service.controller.create_pool("fast", size=64 << 20)
            vdisk = await service.controller.create_vdisk("vm1", "fast", 16 << 20, True, 512)
            checks = ["pool=fast", "pool=slow", "pool=fast;pool=fast", "pool=fast,vdisk=1", "x" * 161]
            checks += [f"pool=fast;vdisk={vdisk.id};serial={vdisk.serial}", f"pool=fast;vdisk={vdisk.id};serial=0"]
            return [service._check_cfgstring(c) for c in checks]
        finally:
            await service.stop()

    assert asyncio.run(scenario()) == [
        None,
        "no pool named 'slow'",
        "pool is given twice",
        "separate cfgstring items with ';', without commas, colons, spaces or control characters",
        "cfgstring is 161 characters; at most 160",
        None,
        "no vdisk 1 with serial 0",
    ]
