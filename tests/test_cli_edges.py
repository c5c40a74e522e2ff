"""The CLI's rough edges, as a new user met them: each case ends with one true line, never a traceback."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import SanServer, assert_one_line, free_port, run_san, san_command


def test_version_and_help_say_what_each_option_does_and_its_default() -> None:
    version = run_san("--version")
    assert version.returncode == 0 and version.stdout.strip() == "san 0.1.0"
    serve = run_san("serve", "--help").stdout
    for text in ("--commit-interval", "(default 1.0)", "--log-level", "what to log on stderr (default info)", "(default on)"):
        assert text in " ".join(serve.split()), text
    top = " ".join(run_san("--help").stdout.split())
    assert "management API URL (env SAN_API; default http://127.0.0.1:8080)" in top
    pool = " ".join(run_san("pool", "create", "--help").stdout.split())
    assert "(default 80)" in pool and "sequential writers (default 4)" in pool
    vdisk = " ".join(run_san("vdisk", "create", "--help").stdout.split())
    assert "the pool its segments come from" in vdisk and "logical block size in bytes (default 512)" in vdisk
    listing = " ".join(run_san("vdisk", "list", "--help").stdout.split())
    assert "--json print the API's JSON unchanged" in listing


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--data", "DIR", "--iqn", "Not An IQN"], "'Not An IQN' is not an iSCSI name"),
        (["serve", "--data", "DIR", "--commit-interval", "0"], "0 is not between 0.01 and 3600 seconds"),
        (["demo", "--data", "DIR", "--iqn", "iqn.bad"], "is not an iSCSI name"),
    ],
)
def test_bad_service_options_are_refused_in_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_san(*[str(tmp_path / "data") if a == "DIR" else a for a in args], timeout=20)
    assert result.returncode == 2 and expected in assert_one_line(result.stderr)
    assert not (tmp_path / "data").exists()


def test_a_data_path_that_is_a_file_is_one_true_line(tmp_path: Path) -> None:
    afile = tmp_path / "passwd"
    afile.write_text("root:x:0:0\n")
    result = run_san("serve", "--data", str(afile), "--api", f"127.0.0.1:{free_port()}", timeout=20)
    assert result.returncode == 1
    assert f"{afile} is not a directory" in assert_one_line(result.stderr)
    assert afile.read_text() == "root:x:0:0\n"


def test_grow_says_the_size_it_grew_to(san_server: SanServer) -> None:
    san_server.ok("pool", "create", "edges", "--size", "128G")
    assert (
        san_server.ok("vdisk", "create", "exact", "--pool", "edges", "--size", "60G")
        .strip()
        .startswith("vdisk exact created: 60G thin")
    )
    assert san_server.ok("vdisk", "grow", "exact", "--size", "61441M").strip() == "vdisk exact grown to 61441M"
    assert san_server.vdisks()["exact"]["size_bytes"] == 61441 << 20


def test_a_closed_pipe_is_not_an_error(san_server: SanServer) -> None:
    san_server.ok("pool", "create", "pipes", "--size", "4G")
    for index in range(400):  # over 64 KiB of JSON: more than a pipe holds
        status, _ = san_server.http("POST", "/vdisks", {"name": f"pipe{index:03}", "pool": "pipes", "size": "1M"})
        assert status == 201
    reader = subprocess.Popen([*san_command(), "vdisk", "list", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=san_server.env())  # fmt: skip
    assert reader.stdout is not None and reader.stderr is not None
    assert reader.stdout.readline().strip() == b"["
    reader.stdout.close()  # as `| head -1` does
    assert reader.wait(timeout=60) == 0
    assert reader.stderr.read() == b""


def test_the_api_option_pointed_at_the_iscsi_port_is_one_line(san_server: SanServer) -> None:
    result = run_san("--api", f"127.0.0.1:{san_server.iscsi_port}", "status")
    assert result.returncode == 1
    assert "does not answer as the san API" in assert_one_line(result.stderr)


def _api_up(port: int) -> None:
    """The banner comes just before the API listens; a SIGTERM is handled once it does."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the demo's API did not answer")


def _demo(data: Path, api: int, portal: int, *extra: str) -> subprocess.Popen[str]:
    command = [*san_command(), "demo", "--data", str(data), "--api", f"127.0.0.1:{api}", "--portal", f"127.0.0.1:{portal}"]
    return subprocess.Popen([*command, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _banner(demo: subprocess.Popen[str]) -> str:
    assert demo.stdout is not None
    seen = ""
    deadline = time.monotonic() + 60
    while "Ctrl-C stops the target" not in seen:
        line = demo.stdout.readline()
        assert line and time.monotonic() < deadline, f"the demo did not start:\n{seen}"
        seen += line
    return seen


def test_demo_on_an_existing_data_dir_says_the_size_it_serves(tmp_path: Path) -> None:
    api = free_port()
    first = _demo(tmp_path / "data", api, free_port(), "--size", "1G")
    try:
        assert "thin vdisk demo0 (1G)" in _banner(first)
        _api_up(api)
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
    again = _demo(tmp_path / "data", api, free_port(), "--size", "2G")
    try:
        shown = _banner(again)
        _api_up(api)
        assert "demo0 already exists" in shown and "with 1G: --size 2G applies to a new data directory" in shown
        assert "thin vdisk demo0 (1G)" in shown and "(2G)" not in shown.split("already exists")[1].split("\n", 1)[1]
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=60) == 0


def test_demo_with_the_api_port_busy_makes_nothing_and_says_why(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        demo = _demo(tmp_path / "data", port, free_port())
        output, _ = demo.communicate(timeout=60)
    assert demo.returncode == 1
    assert "san demo:" not in output, "no banner for a demo that cannot serve"
    assert "cannot listen for the management API" in output and "Address already in use" in output
    assert not (tmp_path / "data").exists()


ROOT = Path(__file__).parent.parent


def test_the_man_page_and_bash_completion_are_the_parsers() -> None:
    from san.cli.generate import bash_completion, manpage

    assert (ROOT / "docs" / "san.1").read_text() == manpage(), "run `make docs` and commit docs/"
    assert (ROOT / "docs" / "san.bash-completion").read_text() == bash_completion(), "run `make docs` and commit docs/"
    shown = subprocess.run(["man", "-l", str(ROOT / "docs" / "san.1")], capture_output=True, text=True, check=False,
                           env={"MANWIDTH": "120", "PATH": "/usr/bin:/bin"}, timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr  # `make test` installs man-db
    assert "san vdisk create" in shown.stdout and "--block-size" in shown.stdout
    script = (
        f"source {ROOT / 'docs' / 'san.bash-completion'}; COMP_WORDS=(san vdisk create x --bl); COMP_CWORD=4;"
        ' _shtab_san; echo "${COMPREPLY[@]}"; COMP_WORDS=(san po); COMP_CWORD=1; _shtab_san; echo "${COMPREPLY[@]}"'
    )
    completed = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert completed.stdout.split("\n")[:2] == ["--block-size", "pool"], completed


def test_the_systemd_units_are_valid(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is not installed: `make test` installs systemd"
    san = shutil.which("san", path=str(Path(sys.executable).parent))
    assert san is not None
    for unit in sorted((ROOT / "systemd").glob("*.service")):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/usr/local/bin/san", san))
        checked = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, check=False, timeout=60)
        problems = [line for line in checked.stderr.splitlines() if "man san(1)" not in line and line.strip()]
        assert not problems, (unit.name, problems)
