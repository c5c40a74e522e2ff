"""A loop device over a file, for tests that need a real block device (skipped where none can be made)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    """Attach backing to a free loop device; its path, detached again on exit."""
    attach = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=False)
    if attach.returncode != 0:
        pytest.skip(f"no loop device here (needs root and /dev/loop-control): {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
