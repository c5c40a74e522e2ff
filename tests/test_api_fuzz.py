"""The management API fuzzed from its own /openapi.json with schemathesis: valid and invalid bodies, paths and
parameters for every operation, bounded in time. No answer may be a 5xx, the log may hold no traceback, and the
store must stay clean (serving() checks it after the server stops).

The server's data directory is a small tmpfs, so whatever pools and thick vdisks the fuzzer creates stay small."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import serving
from storage_faults import small_filesystem

MAX_SECONDS = 120


def schemathesis() -> list[str]:
    script = Path(sys.executable).with_name("st")
    if not script.exists() and shutil.which("st") is None:
        pytest.fail("schemathesis is not installed (make venv installs it with the test extras)")
    return [str(script) if script.exists() else "st"]


def test_no_request_makes_the_api_fail(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "fuzz", "256m") as base, serving(base, "--portal", "none") as server:
        server.ok("pool", "create", "seed", "--size", "32M")
        server.ok("vdisk", "create", "seed", "--pool", "seed", "--size", "16M")
        server.ok("host", "create", "seed", "--iqn", "iqn.2024-01.org.example:seed")
        server.ok("zone", "add", "seed", "seed")
        result = subprocess.run(
            [
                *schemathesis(),
                "run",
                f"{server.api}/openapi.json",
                "--header",
                f"Authorization: Bearer {server.token}",
                "--checks",
                "not_a_server_error",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--max-time",
                str(MAX_SECONDS),
                "--max-examples",
                "60",
                "--workers",
                "1",
                "--request-timeout",
                "60",
                "--seed",
                "9",
                "--generation-database",
                "none",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=MAX_SECONDS + 240,
            cwd=tmp_path,
            check=False,
        )
        report = result.stdout[-6000:] + result.stderr[-2000:]
        assert result.returncode == 0, report
        assert "API Operations" in result.stdout or "operations" in result.stdout.lower(), report
        log = server.log_text()
        assert "Traceback" not in log and "Exception" not in log, log[-4000:]
