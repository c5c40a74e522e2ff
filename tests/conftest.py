"""Fixtures for the end-to-end tests: a real `san serve` subprocess and the real `san` CLI driving it.

SanServer starts, stops and restarts one server on one data directory; `san_server` is a module-wide one that
must stop with exit status 0 and leave a store that `san check` finds clean."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
CLI_TIMEOUT = 60.0
# Servers started by the tests publish their API tokens here, not in /run/san; the CLIs they start look here too.
os.environ.setdefault("SAN_RUNTIME_DIR", tempfile.mkdtemp(prefix="san-run-"))


def san_command() -> list[str]:
    """The `san` entry point of the interpreter running the tests (its console script, else `-m`)."""
    script = Path(sys.executable).with_name("san")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "san.cli.main"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_san(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = CLI_TIMEOUT,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the `san` CLI as a subprocess; never raises on a non-zero exit (TimeoutExpired if it hangs). Its stdin is
    input (else empty)."""
    return subprocess.run(
        [*san_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else dict(os.environ),
        cwd=cwd,
        check=False,
        input=input if input is not None else "",
    )


def check_data(data: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """`san check --data DIR`."""
    return run_san("check", "--data", str(data))


class SanServer:
    """One `san serve --data DATA --api 127.0.0.1:PORT` subprocess, started on demand, with CLI and HTTP helpers."""

    def __init__(self, data: Path, cwd: Path, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.data = str(data)
        self.cwd = cwd
        self.port = port if port is not None else free_port()
        self.iscsi_port = free_port()
        self.extra = extra
        self.api = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None
        self.log = cwd / "serve.log"

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> SanServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [
                    *san_command(),
                    "serve",
                    "--data",
                    self.data,
                    "--api",
                    f"127.0.0.1:{self.port}",
                    "--portal",
                    f"127.0.0.1:{self.iscsi_port}",
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=self.cwd,
                env=self.env(),
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"san serve exited with {self.proc.returncode} while starting:\n{self.log_text()}")
            try:
                if self.http("GET", "/status", timeout=1)[0] == 200:
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.kill()
        raise AssertionError(f"san serve did not answer GET /status within {START_TIMEOUT}s:\n{self.log_text()}")

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed, and the test failed, if it does not stop in time)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"san serve did not stop within {STOP_TIMEOUT}s of SIGTERM") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    # -- clients -------------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SAN_API"] = self.api
        return env

    def run(
        self, *args: str, cwd: str | os.PathLike[str] | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The `san` CLI against this server (through SAN_API)."""
        return run_san(*args, env=self.env(), cwd=cwd, input=input)

    def ok(self, *args: str, input: str | None = None) -> str:
        """Run the CLI, insist on success, return stdout."""
        result = self.run(*args, input=input)
        assert result.returncode == 0, f"san {' '.join(args)} exited {result.returncode}: {result.stderr}"
        return result.stdout

    def fails(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the CLI, insist on failure (exit status 1), return the result."""
        result = self.run(*args, input=input)
        assert result.returncode == 1, f"san {' '.join(args)} exited {result.returncode}: {result.stdout}{result.stderr}"
        return result

    def json(self, *args: str) -> Any:
        """Run a CLI command with --json and parse its output."""
        return json.loads(self.ok(*args, "--json"))

    def pools(self) -> dict[str, Any]:
        return {p["name"]: p for p in self.json("pool", "list")}

    def vdisks(self) -> dict[str, Any]:
        return {v["name"]: v for v in self.json("vdisk", "list")}

    def state(self) -> tuple[Any, Any, list[str]]:
        """What `pool list --json` and `vdisk list --json` print (read straight from the API, which is much faster
        than two CLI processes; test_cli checks that the two agree) and the files under DATA/pools."""
        pools_dir = Path(self.data) / "pools"
        files = sorted(os.listdir(pools_dir)) if pools_dir.is_dir() else []
        return self.get("/pools"), self.get("/vdisks"), files

    def get(self, path: str) -> Any:
        """GET a resource of the API, insisting on 200."""
        status, body = self.http("GET", path)
        assert status == 200, (path, status, body)
        return body

    @property
    def token(self) -> str | None:
        """The server's API token (DATA/api-token), once it has made one."""
        try:
            return (Path(self.data) / "api-token").read_text().strip()
        except OSError:
            return None

    def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        token: str | None = "",
        timeout: float = 30,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(status, parsed JSON body or None) of one request to the management API, with the server's token (or
        the given one; None sends none)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.api + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        token = self.token if token == "" else token
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        return status, (json.loads(payload) if payload else None)


class ClusterServer(SanServer):
    """`san controller` and one `san gateway` on 127.0.0.1 as two processes: the API is the controller's, the
    iSCSI portal (iscsi_port) the gateway's; log_text() is both logs."""

    def __init__(self, data: Path, cwd: Path, iqn: str, gateway_extra: tuple[str, ...] = ()) -> None:
        super().__init__(data, cwd)
        self.iqn = iqn
        self.gateway_extra = gateway_extra
        self.listen = free_port()
        self.certs = cwd / "cluster"
        self.gateway: subprocess.Popen[str] | None = None
        self.gateway_log = cwd / "gateway.log"

    def start(self) -> SanServer:
        self.cwd.mkdir(parents=True, exist_ok=True)
        if not self.certs.exists():
            assert run_san("cluster", "init", str(self.certs), "--nodes", "controller,gw1").returncode == 0
        listen, certs = f"127.0.0.1:{self.listen}", str(self.certs)
        controller = ["controller", "--data", self.data, "--listen", listen, "--cluster", certs]
        controller += ["--api", f"127.0.0.1:{self.port}"]
        gateway = ["gateway", "--name", "gw1", "--controller", listen, "--cluster", certs, "--storage", f"{self.data}/pools"]
        gateway += ["--portal", f"127.0.0.1:{self.iscsi_port}", "--iqn", self.iqn, *self.gateway_extra]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [*san_command(), *controller], stdout=log, stderr=subprocess.STDOUT, text=True, cwd=self.cwd, env=self.env()
            )
        with open(self.gateway_log, "a") as log:
            self.gateway = subprocess.Popen(
                [*san_command(), *gateway], stdout=log, stderr=subprocess.STDOUT, text=True, cwd=self.cwd, env=self.env()
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None or self.gateway.poll() is not None:
                raise AssertionError(f"the cluster did not start:\n{self.log_text()}")
            if "registered with the controller" in self.gateway_log.read_text():
                return self
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"the gateway did not register within {START_TIMEOUT}s:\n{self.log_text()}")

    def stop(self) -> int:
        """SIGTERM to the gateway, then the controller; the controller's exit status (0 only if both were 0)."""
        assert self.gateway is not None
        if self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            self.gateway.wait(timeout=STOP_TIMEOUT)
        status = super().stop()
        return status if self.gateway.returncode == 0 else self.gateway.returncode

    def kill(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.kill()
            self.gateway.wait(timeout=STOP_TIMEOUT)
        super().kill()

    @property
    def running(self) -> bool:
        return super().running and self.gateway is not None and self.gateway.poll() is None

    def log_text(self) -> str:
        gateway = self.gateway_log.read_text() if self.gateway_log.exists() else ""
        return super().log_text() + "\n--- gateway\n" + gateway


@contextlib.contextmanager
def serving_cluster(base: Path, iqn: str) -> Iterator[SanServer]:
    """serving() for a two-process cluster (controller + one gateway)."""
    server = ClusterServer(base / "data", base / "cwd", iqn)
    server.start()
    try:
        yield server
    finally:
        assert server.running, f"the cluster died during the tests:\n{server.log_text()}"
        assert server.stop() == 0, server.log_text()
        assert_clean(server.data)


@contextlib.contextmanager
def running_server(data: Path, cwd: Path, *extra: str) -> Iterator[SanServer]:
    """A started server (with extra options) that is killed if the test leaves it running."""
    server = SanServer(data, cwd, extra=extra).start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def serving(base: Path, *extra: str) -> Iterator[SanServer]:
    """A started `san serve` with extra options for a module's tests: at the end it must still be running, stop with
    exit status 0 on SIGTERM and leave a store that `san check` finds clean."""
    server = SanServer(base / "data", base / "cwd", extra=extra)
    server.start()
    try:
        yield server
    finally:
        assert server.running, f"san serve died during the tests:\n{server.log_text()}"
        assert server.stop() == 0, server.log_text()
        assert_clean(server.data)


def assert_one_line(stderr: str) -> str:
    """stderr is exactly one non-empty line; returns it."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip() and stderr.endswith("\n"), f"expected one line on stderr, got {stderr!r}"
    return lines[0]


def assert_clean(data: str | os.PathLike[str]) -> None:
    result = check_data(data)
    assert result.returncode == 0, f"san check found damage:\n{result.stdout}{result.stderr}"
    assert result.stdout.rstrip().endswith("clean")


@pytest.fixture(scope="module")
def san_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanServer]:
    """A real `san serve` for the whole module; at the end it must stop on SIGTERM with 0 and leave a clean store."""
    base = tmp_path_factory.mktemp("san")
    # Tests take over files they make under the session's temporary directory (pool create --existing).
    server = SanServer(base / "data", base / "cwd", extra=("--allow-path", str(tmp_path_factory.getbasetemp())))
    server.start()
    try:
        yield server
    finally:
        if not server.running:
            status = server.proc.returncode if server.proc else None
            server.kill()
            pytest.fail(f"san serve died during the tests (exit {status}):\n{server.log_text()}")
        status = server.stop()
        assert status == 0, f"san serve exited {status} on SIGTERM:\n{server.log_text()}"
        assert_clean(server.data)
        shutil.rmtree(base, ignore_errors=True)
