"""The production path in a real kernel: LIO + san's TCMU handler in a QEMU VM (vagrant/qemu_vm.py), with open-iscsi
and iscsi-test-cu as clients; each test is one VM run of the scripts Vagrant's provisioning runs too."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from san.service import lio_present

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "vagrant" / "qemu_vm.py"
README = ROOT / "README.md"
SCRIPTS = "vagrant/scripts"
READER = "iqn.2026-11.org.san.test:reader"



def in_vm(tmp_path: Path, script: str, timeout: float = 900) -> str:
    """Run a shell script in a fresh VM from the checkout's root; returns its log (asserting it exited 0)."""
    assert shutil.which("qemu-system-x86_64"), "qemu-system-x86_64 is missing: `make test` installs qemu-system-x86"
    job = tmp_path / "job.sh"
    job.write_text("set -e\nexport SAN_DATA=/var/lib/san\ntrap 'cp $SAN_DATA/serve.log /vmout/ 2>/dev/null' EXIT\n" + script)
    out = tmp_path / "vm"
    done = subprocess.run(
        [sys.executable, str(HARNESS), "--out", str(out), "--timeout", str(timeout), "--", "bash", str(job)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout + 60,
        check=False,
    )
    log = done.stdout
    serve_log = ""
    if done.returncode != 0:
        console = (out / "console.log").read_text(errors="replace")[-4000:] if (out / "console.log").exists() else ""
        served = (out / "serve.log").read_text(errors="replace")[-4000:] if (out / "serve.log").exists() else ""
        serve_log = f"\n--- stderr\n{done.stderr}\n--- console (end)\n{console}\n--- san serve.log (end)\n{served}"
    assert done.returncode == 0, log + serve_log
    return log


@pytest.mark.slow
def test_filesystem_handler_restart_and_clean_stop(tmp_path: Path) -> None:
    """ext4 through LIO + san (fsck, remount, log in again), a kill -9 of the handler under I/O, a clean stop that
    removes san's LIO objects and leaves a foreign fileio object alone."""
    log = in_vm(
        tmp_path,
        f"""
.venv/bin/python - <<'EOF'
import os, rtslib
os.makedirs("/etc/target", exist_ok=True)
open("/var/tmp/foreign.img", "wb").truncate(1 << 20)
rtslib.FileIOStorageObject("foreign", "/var/tmp/foreign.img", 1 << 20)
EOF
{SCRIPTS}/lio-target.sh
{SCRIPTS}/initiator-fs.sh 127.0.0.1:3260
{SCRIPTS}/handler-restart.sh 127.0.0.1:3260
{SCRIPTS}/lio-stop.sh
test -d /sys/kernel/config/target/core/fileio_*/foreign && echo "foreign fileio object kept"
""",
    )
    for line in ("initiator-fs: ok", "verified after logging in again", "handler-restart: ok", "lio-stop: san stopped",
                 "foreign fileio object kept"):  # fmt: skip
        assert line in log, log


@pytest.mark.slow
def test_zoning_live_zone_and_thin_provisioning(tmp_path: Path) -> None:
    """An unknown initiator sees nothing; a read-only zone refuses writes; a zone added while logged in appears on a
    rescan; a fresh ext4 on a 4 GiB thin vdisk allocates only what it writes and fstrim gives space back."""
    log = in_vm(
        tmp_path,
        f"""
READONLY_INITIATORS={READER} {SCRIPTS}/lio-target.sh
{SCRIPTS}/initiator-zoning.sh 127.0.0.1:3260 {READER}
{SCRIPTS}/thin-trim.sh 127.0.0.1:3260 disk0
. {SCRIPTS}/iscsi-lib.sh
first=$(login default 127.0.0.1:3260)
.venv/bin/san vdisk create disk1 --pool pool0 --size 64M
.venv/bin/san zone add host0 disk1 --lun 1
iscsiadm -m session --rescan >/dev/null
for _ in $(seq 50); do
    [ "$(iscsiadm -m session -P 3 | grep -c 'Attached scsi disk')" = 2 ] && break
    sleep 0.2
done
echo "disks after the live zone: $(iscsiadm -m session -P 3 | grep -c 'Attached scsi disk')"
logout default
{SCRIPTS}/lio-stop.sh
""",
    )
    for line in ("initiator-zoning: ok", "thin-trim: ok", "disks after the live zone: 2", "lio-stop: san stopped"):
        assert line in log, log


@pytest.mark.slow
def test_conformance_against_lio_fileio(tmp_path: Path) -> None:
    """iscsi-test-cu, every suite of family ALL with --dataloss, against LIO + san and LIO + fileio in the same VM:
    san's handler fails no test that fileio passes."""
    log = in_vm(tmp_path, ".venv/bin/python vagrant/scripts/conformance.py --report /vmout/conformance.json", 1800)
    report = json.loads((tmp_path / "vm" / "conformance.json").read_text())
    assert report["unexplained"] == [], log
    assert len(report["san"]) > 200, log
    readme = README.read_text()
    listed = readme[readme.index("#### Conformance through LIO") : readme.index("### Management API")]
    for test in report["tcmu_runner_fails_too"]:
        suite, name = test.split(".", 1)
        assert re.search(rf"{suite}\.[^|]*\b{name}\b", listed), f"{test} fails through TCMU and is not in the README"
    print(log)


def test_vagrantfile_validates() -> None:
    """Vagrant parses the two-machine Vagrantfile (no provider can run here, so provider blocks are not checked)."""
    assert shutil.which("vagrant"), "vagrant is missing: `make test` installs it"
    done = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"], cwd=ROOT / "vagrant", capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "validated successfully" in done.stdout, done.stdout + done.stderr


def test_lio_frontend_without_lio_is_one_clear_error(tmp_path: Path) -> None:
    """On a kernel without LIO (the development machines'), --frontend lio refuses to start, with one line."""
    if lio_present():
        pytest.skip("this kernel has LIO: the VM tests cover --frontend lio")
    done = subprocess.run(
        [str(ROOT / ".venv/bin/san"), "serve", "--frontend", "lio", "--data", str(tmp_path / "d"), "--portal", "none"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "needs LIO" in errors[0], done.stderr
