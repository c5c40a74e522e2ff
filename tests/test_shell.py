"""san-shell (targetcli-ext/) against a real `san serve`: one-shot commands and an interactive session through a pty
(pexpect), with Tab completion; after every command the tree `ls` shows is what the API says; saveconfig, wipe,
restoreconfig gives back the same configuration."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from conftest import SanServer, serving

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NODE = re.compile(r"^(?P<indent>[ |]*)o- (?P<name>\S+) \.*\s*\[(?P<summary>.*)\]\s*$")


def shell_command() -> list[str]:
    script = Path(sys.executable).with_name("san-shell")
    assert script.exists(), "san-shell is not installed: `make venv` installs targetcli-ext"
    return [str(script)]


def shell_env(server: SanServer, home: Path) -> dict[str, str]:
    return {**server.env(), "HOME": str(home), "TERM": "xterm", "COLUMNS": "200", "LINES": "50"}


def one_shot(server: SanServer, home: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*shell_command(), *words], capture_output=True, text=True, env=shell_env(server, home),
                          timeout=60, check=False)  # fmt: skip


def ok(server: SanServer, home: Path, *words: str) -> str:
    done = one_shot(server, home, *words)
    assert done.returncode == 0, (words, done.stdout, done.stderr)
    return done.stdout


def tree(server: SanServer, home: Path) -> dict[str, str]:
    """`ls /` as {path: summary}."""
    paths: dict[str, str] = {}
    stack: list[str] = []
    for line in ANSI.sub("", ok(server, home, "ls", "/")).splitlines():
        found = NODE.match(line)
        assert found, f"not a tree line: {line!r}"
        depth = len(found["indent"]) // 2
        stack[depth:] = [found["name"]]
        paths["/" + "/".join(stack[1:])] = found["summary"]
    return paths


def assert_tree_matches_api(server: SanServer, home: Path) -> dict[str, str]:
    shown = tree(server, home)
    expected = {"/", "/pools", "/vdisks", "/hosts", "/gateways", "/jobs"}
    for pool in server.get("/pools"):
        expected |= {f"/pools/{pool['name']}"} | {f"/pools/{pool['name']}/container{c['id']}" for c in pool["containers"]}
        assert f"data {pool['used_percent']:.1f}%" in shown[f"/pools/{pool['name']}"]
    for vdisk in server.get("/vdisks"):
        expected.add(f"/vdisks/{vdisk['name']}")
        data = 100 * vdisk["allocated_bytes"] / vdisk["size_bytes"]
        assert f"data {data:.1f}%" in shown[f"/vdisks/{vdisk['name']}"]
    for host in server.get("/hosts"):
        expected |= {f"/hosts/{host['name']}", f"/hosts/{host['name']}/luns"}
        for zone in host["zones"]:
            expected.add(f"/hosts/{host['name']}/luns/{zone['lun']}")
            assert shown[f"/hosts/{host['name']}/luns/{zone['lun']}"].startswith(zone["vdisk"] + " (")
    for gateway in server.get("/gateways"):
        expected.add(f"/gateways/{gateway['name']}")
    expected |= {f"/jobs/allocate-{v['name']}" for v in server.get("/vdisks") if v["state"] == "allocating"}
    assert set(shown) == expected
    return shown


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SanServer]:
    with serving(tmp_path / "san") as san:
        yield san


def test_one_shot_commands_keep_the_tree_equal_to_the_api(server: SanServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert_tree_matches_api(server, home)
    steps = [
        ("/pools", "create", "name=fast", "size=256M", "segment_size=64K"),
        ("/vdisks", "create", "name=vm1", "pool=fast", "size=40M"),
        ("/vdisks", "create", "name=vm2", "pool=fast", "size=8M", "block_size=4096"),
        ("/hosts", "create", "name=web", "iqn=iqn.2024-01.org.example:web"),
        ("/hosts/web/luns", "create", "vdisk=vm1"),
        ("/hosts/web/luns", "create", "vdisk=vm2", "lun=5", "read_only=true"),
        ("/vdisks/vm1", "grow", "size=48M"),
        ("/vdisks/vm2", "set", "attribute", "size=16M"),
        ("/hosts/web/luns", "delete", "lun=0"),
        ("/hosts/web/luns", "move", "lun=5", "to=2"),
        ("/hosts/web/luns/2", "set", "attribute", "read_only=false"),
        ("/vdisks/vm1", "rename", "name=database"),
        ("/hosts/web", "modify", "iqn=iqn.2024-01.org.example:web2"),
    ]
    for step in steps:
        ok(server, home, *step)
        assert_tree_matches_api(server, home)
    assert server.vdisks()["database"]["size_bytes"] == 48 << 20 and server.vdisks()["vm2"]["size_bytes"] == 16 << 20
    assert ok(server, home, "/vdisks/vm2", "get", "attribute", "block_size").split() == ["block_size=4096", "[ro]"]
    assert [(z["lun"], z["read_only"]) for z in server.get("/zones")] == [(2, False)]
    assert server.get("/hosts/web")["iqn"] == "iqn.2024-01.org.example:web2"


def test_a_refused_command_is_the_servers_line_and_changes_nothing(server: SanServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    ok(server, home, "/pools", "create", "name=p", "size=64M")
    before = server.state()
    for words, expected in (
        (("/vdisks", "create", "name=v", "pool=nope", "size=1M"), "no pool named 'nope'"),
        (("/vdisks", "create", "name=v", "pool=p", "size=lots"), "size:"),
        (("/pools", "delete", "name=missing"), "no pool named 'missing'"),
        (("/pools/p", "set", "attribute", "warn_percent=3"), "read-only"),
    ):
        refused = one_shot(server, home, *words)
        assert refused.returncode == 1 and expected in refused.stderr, (words, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert server.state() == before


def test_an_interactive_session_with_tab_completion(server: SanServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    ok(server, home, "/pools", "create", "name=fast", "size=256M")
    ok(server, home, "/vdisks", "create", "name=database", "pool=fast", "size=10M")
    child = pexpect.spawn(shell_command()[0], env=shell_env(server, home), encoding="utf-8", timeout=30,
                          dimensions=(50, 200))  # fmt: skip
    try:
        child.expect(r"/> ")
        child.send("cd /vd\t")  # a path: completes to /vdisks/
        child.expect("vdisks/")
        child.send("da\t")  # an object name under it
        child.expect("database")
        child.send("\r")
        child.expect(r"/vdisks/database> ")
        child.send("cd ..\r")
        child.expect(r"/vdisks> ")
        child.send("create name=vm9 pool=f\t")  # a parameter's value: the pool's name
        child.expect("fast ")
        child.send("si\t")  # a parameter's name
        child.expect("size=")
        child.send("12M\r")
        child.expect("Created vdisk vm9: 12.00M thin in pool fast")
        child.expect(r"/vdisks> ")
        child.send("ls\r")
        child.expect(r"vm9\S* \S*\.+.*12\.00M thin in fast, data 0\.0%")  # health in green, on a terminal
        child.expect(r"/vdisks> ")
        child.send("delete name=nothing\r")
        child.expect("no vdisk named 'nothing'")
        child.expect(r"/vdisks> ")
        child.send("exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert sorted(server.vdisks()) == ["database", "vm9"]
    assert_tree_matches_api(server, home)


def test_saveconfig_wipe_restoreconfig_gives_back_the_same_configuration(server: SanServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("sixteen-chars-or-more\n")
    for step in (
        ("/pools", "create", "name=fast", "size=128M", "segment_size=64K", "warn_percent=70"),
        ("/vdisks", "create", "name=vm1", "pool=fast", "size=20M"),
        ("/vdisks", "create", "name=vm2", "pool=fast", "size=4M", "thick=true"),
        ("/hosts", "create", "name=web", "iqn=iqn.2024-01.org.example:web", "chap_user=web", f"chap_secret_file={secret}"),
        ("/hosts/web/luns", "create", "vdisk=vm1", "lun=2"),
    ):
        ok(server, home, *step)
    saved = tmp_path / "saved.json"
    ok(server, home, "saveconfig", f"savefile={saved}", "with_secrets=true")
    assert saved.stat().st_mode & 0o777 == 0o600
    before = json.loads(server.ok("config", "export", "--with-secrets"))
    ok(server, home, "/hosts/web/luns", "delete", "lun=2")
    ok(server, home, "/hosts", "delete", "name=web")
    for name in ("vm1", "vm2"):
        ok(server, home, "/vdisks", "delete", f"name={name}")
    ok(server, home, "/pools", "delete", "name=fast")
    assert server.get("/pools") == [] and server.get("/hosts") == []
    said = ok(server, home, "restoreconfig", f"savefile={saved}")
    assert "5 change(s), 0 unchanged" in said
    assert json.loads(server.ok("config", "export", "--with-secrets")) == before
    assert_tree_matches_api(server, home)


def test_the_package_installs_alone_into_a_fresh_venv(server: SanServer, tmp_path: Path) -> None:
    """`pip install ./targetcli-ext` by itself needs only configshell-fb (pinned); the typed client it drives is san's
    (stdlib only): without san it says so in one line, with san's source on the path it serves the tree."""
    root = Path(__file__).parent.parent
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(root / "constraints.txt"),
                           str(root / "targetcli-ext")], capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    program = str(venv / "bin" / "san-shell")
    env = {k: v for k, v in shell_env(server, tmp_path).items() if k != "PYTHONPATH"}
    alone = subprocess.run([program, "ls"], capture_output=True, text=True, timeout=60, check=False, env=env)
    assert alone.returncode == 1 and "install configshell-fb and the san package" in alone.stderr, alone.stderr
    with_san = subprocess.run([program, "ls"], capture_output=True, text=True, timeout=60, check=False,
                              env={**env, "PYTHONPATH": str(root)})  # fmt: skip
    assert with_san.returncode == 0 and "o- vdisks" in with_san.stdout, with_san.stderr
