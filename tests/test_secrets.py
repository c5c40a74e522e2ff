"""Secrets: the data directory is 0700 and every file in it 0600 (even one an older san made 0644); CHAP secrets come
from a file, stdin or a prompt, never from the command line, and are never logged or returned.

The original: san.db (CHAP secrets in plaintext) was created 0644 in a 0755 directory, readable by any user, and the
secrets could only be given on the command line, where ps shows them to every user while the CLI runs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import stat
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SanServer, assert_one_line, san_command, serving
from rawiscsi import RawInitiator

SECRET = "sekrit-value-that-must-not-leak"
MUTUAL = "another-secret-value-for-the-target"
TARGET = "iqn.2003-01.org.san:secrets"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def modes(data: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(data.stat().st_mode)}
    for root, dirs, files in os.walk(data):
        for name in dirs + files:
            path = Path(root) / name
            found[str(path.relative_to(data))] = stat.S_IMODE(path.lstat().st_mode)
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanServer]:
    with serving(tmp_path_factory.mktemp("secrets"), "--iqn", TARGET) as san:
        san.ok("pool", "create", "p", "--size", "64M")
        san.ok("vdisk", "create", "v", "--pool", "p", "--size", "16M")
        yield san


def test_the_data_directory_is_private(server: SanServer) -> None:
    found = modes(Path(server.data))
    assert {"san.db", "san.db-wal", "lock", "api-token", "pools/p.img"} <= set(found), found
    wrong = {name: oct(mode) for name, mode in found.items() if mode & 0o077}
    assert wrong == {}, f"readable by others: {wrong}"
    probe = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", f"open({server.data + '/san.db'!r}).read()"], capture_output=True)
    assert probe.returncode != 0


def test_a_store_made_readable_by_an_older_san_is_tightened(tmp_path: Path) -> None:
    with serving(tmp_path / "first") as server:
        server.ok("pool", "create", "p", "--size", "16M")
    data = tmp_path / "first" / "data"
    os.chmod(data, 0o755)
    os.chmod(data / "san.db", 0o644)
    os.chmod(data / "pools", 0o755)
    os.chmod(data / "pools" / "p.img", 0o644)
    with serving(tmp_path / "first") as server:
        wrong = {name: oct(mode) for name, mode in modes(data).items() if mode & 0o077}
        assert wrong == {}, wrong
        assert "was readable by others (mode 644); now 600" in server.log_text()


def test_secrets_never_come_from_the_command_line(server: SanServer) -> None:
    for flag in ("--chap-secret", "--mutual-secret"):
        result = server.run("host", "create", "x", "--iqn", "iqn.2024-01.org.example:x", "--chap-user", "x", flag, SECRET)
        assert result.returncode == 2
        line = assert_one_line(result.stderr)
        assert f"{flag}-file" in line and SECRET not in line
    result = server.run("host", "create", "x", "--iqn", "iqn.2024-01.org.example:x", "--chap-user", "x")
    assert result.returncode == 1 and "--chap-secret-file" in assert_one_line(result.stderr), "no terminal: say how instead"
    assert all(h["name"] != "x" for h in server.get("/hosts"))


def test_a_secret_from_stdin_is_not_in_the_process_list(server: SanServer, tmp_path: Path) -> None:
    mutual = tmp_path / "mutual"
    mutual.write_text(MUTUAL + "\n")
    command = [*san_command(), "host", "create", "carol", "--iqn", "iqn.2024-01.org.example:carol", "--chap-user", "carol",
               "--chap-secret-file", "-", "--mutual-user", "target", "--mutual-secret-file", str(mutual)]  # fmt: skip
    cli = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=server.env()
    )
    try:
        time.sleep(1.0)  # it waits for stdin now
        seen = Path(f"/proc/{cli.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "carol" in seen and SECRET not in seen and MUTUAL not in seen
        out, err = cli.communicate(SECRET + "\n", timeout=60)
    finally:
        cli.kill()
    assert cli.returncode == 0, err
    host = server.get("/hosts/carol")
    assert host["chap_user"] == "carol" and host["mutual_user"] == "target"
    answers = str(server.get("/hosts")) + server.ok("host", "show", "carol") + server.ok("host", "list") + out + err
    assert SECRET not in answers and MUTUAL not in answers
    initiator = RawInitiator(server.iscsi_port, "iqn.2024-01.org.example:carol")
    try:
        keys = initiator.login_chap(TARGET, "carol", SECRET, MUTUAL)
        assert keys["CHAP_N"] == "target"
    finally:
        initiator.close()
    wrong = RawInitiator(server.iscsi_port, "iqn.2024-01.org.example:carol")
    try:
        with pytest.raises(ConnectionError):
            wrong.login_chap(TARGET, "carol", SECRET + "x", MUTUAL)
    finally:
        wrong.close()
    log = server.log_text()
    assert SECRET not in log and MUTUAL not in log
    server.ok("host", "delete", "carol")


def test_a_secret_can_be_typed_at_a_prompt(server: SanServer) -> None:
    command = [*san_command(), "host", "create", "dave", "--iqn", "iqn.2024-01.org.example:dave", "--chap-user", "dave"]
    master, slave = os.openpty()
    cli = subprocess.Popen(
        command,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=server.env(),
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    screen = b""

    def until(text: bytes) -> None:
        nonlocal screen
        deadline = time.monotonic() + 30
        while text not in screen:
            assert time.monotonic() < deadline, screen
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                screen += os.read(master, 1024)

    try:
        until(b"chap secret: ")
        os.write(master, SECRET.encode() + b"\n")
        until(b"chap secret again: ")
        os.write(master, SECRET.encode() + b"\n")
        assert cli.wait(timeout=60) == 0
        with contextlib.suppress(OSError):
            while select.select([master], [], [], 0.5)[0]:
                screen += os.read(master, 1024)
    finally:
        cli.kill()
        os.close(master)
    assert SECRET.encode() not in screen, "typed, and not echoed"
    assert b"host dave created" in screen
    assert server.get("/hosts/dave")["chap_user"] == "dave"
    server.ok("host", "delete", "dave")


def test_a_data_directory_someone_else_could_have_prepared_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chown(planted, 65534, 65534)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    (theirs / "san.db").write_bytes(b"")
    os.chown(theirs / "san.db", 65534, 65534)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # writable by everyone, not sticky: anyone may replace what is in it
    linked = tmp_path / "linked"
    linked.mkdir(mode=0o700)
    (linked / "san.db").symlink_to("/etc/passwd")
    for data, words in (
        (planted, "owned by uid 65534"),
        (theirs, "owned by uid 65534"),
        (shared / "data", "can be changed by other users"),
        (linked, "symbolic link"),
    ):
        result = subprocess.run(
            [*san_command(), "serve", "--data", str(data), "--portal", "none", "--api", "127.0.0.1:1"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 1, (data, result.stderr)
        assert words in assert_one_line(result.stderr), (data, result.stderr)
    assert Path("/etc/passwd").read_text().startswith("root:")
