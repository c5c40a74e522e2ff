"""The production path in a real kernel: LIO + san's TCMU handler in a QEMU VM (vagrant/qemu_vm.py), with open-iscsi
and iscsi-test-cu as clients; each test is one VM run of the scripts Vagrant's provisioning runs too."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from san.gateway.service import lio_present

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "vagrant" / "qemu_vm.py"
README = ROOT / "README.md"
SCRIPTS = "vagrant/scripts"
READER = "iqn.2026-11.org.san.test:reader"


class VM:
    """One run of a shell script in a fresh VM (from the checkout's root), started at once and waited for later."""

    def __init__(self, base: Path, script: str, timeout: float = 900) -> None:
        assert shutil.which("qemu-system-x86_64"), "qemu-system-x86_64 is missing: `make test` installs qemu-system-x86"
        job = base / "job.sh"
        keep_log = "trap 'cp $SAN_DATA/serve.log /vmout/ 2>/dev/null || true' EXIT"
        job.write_text(f"set -e\nexport SAN_DATA=/var/lib/san\n{keep_log}\n{script}")
        self.out = base / "vm"
        self.timeout = timeout
        command = [sys.executable, str(HARNESS), "--out", str(self.out), "--timeout", str(timeout), "--", "bash", str(job)]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def log(self) -> str:
        """The script's log, once it has ended (asserting it exited 0; otherwise with the console and san's log)."""
        try:
            stdout, stderr = self.process.communicate(timeout=self.timeout + 60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            stdout, stderr = self.process.communicate()
        if self.process.returncode != 0:
            tails = {name: (self.out / name).read_text(errors="replace")[-4000:] for name in ("console.log", "serve.log")
                     if (self.out / name).exists()}  # fmt: skip
            extra = "".join(f"\n--- {name} (end)\n{text}" for name, text in tails.items())
            raise AssertionError(f"{stdout}\n--- stderr\n{stderr}{extra}")
        return stdout

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def in_vm(tmp_path: Path, script: str, timeout: float = 900) -> str:
    return VM(tmp_path, script, timeout).log()


@pytest.fixture(scope="module")
def conformance_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    """The conformance run is the longest VM run: it starts with the zoning test and runs beside it (not beside the
    handler-restart test, whose outage must stay within LIO's 30 s command timeout on a busy machine)."""
    script = ".venv/bin/python vagrant/scripts/conformance.py --report /vmout/conformance.json"
    vm = VM(tmp_path_factory.mktemp("conformance"), script, 2400)
    yield vm
    vm.stop()


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
def test_zoning_live_zone_and_thin_provisioning(tmp_path: Path, conformance_vm: VM) -> None:
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
def test_stock_targetcli_makes_and_serves_user_san_vdisks(tmp_path: Path) -> None:
    """Debian's targetcli with dbus-daemon --system: user:san is listed with its cfgstring help, a create makes a san
    vdisk that open-iscsi writes and reads (again after the vdisk is renamed and san restarts: the object is bound
    by id and serial), invalid cfgstrings, a taken name and a second object for a served vdisk are refused with
    nothing changed, san's own object deleted by hand comes back, a vdisk deleted in san takes its storage object
    along; san-targetcli shows /san beside /backstores and /iscsi."""
    log = in_vm(tmp_path, f"{SCRIPTS}/targetcli-user-san.sh")
    for line in ("o- user:san", "vdisk vm1: pool0 67108864 bytes, thin", "vm1 written and read back",
                 "vm1's cfgstring is bound: pool=pool0;vdisk=", "cfgstring invalid: no pool named 'nope'",
                 "cfgstring invalid: unknown key 'size'; the keys are pool, vdisk, serial",
                 "refused cfgstrings and a taken name changed nothing",
                 "disk0's storage object, deleted in targetcli, came back",
                 "vm1 served again after it was renamed and san restarted, same data",
                 "vm2 deleted in san", "o- san ", "targetcli-user-san: ok"):  # fmt: skip
        assert line in log, log


@pytest.mark.slow
def test_conformance_against_lio_fileio(conformance_vm: VM) -> None:
    """iscsi-test-cu, every suite of family ALL with --dataloss, against LIO + san, and san's failures against LIO +
    fileio and LIO + tcmu-runner in the same VM: san fails no test that both of them pass."""
    log = conformance_vm.log()
    report = json.loads((conformance_vm.out / "conformance.json").read_text())
    assert report["unexplained"] == [], log
    assert len(report["san"]) > 200, log
    readme = README.read_text()
    listed = readme[readme.index("#### Conformance through LIO") : readme.index("### Management API")]
    for test in report["tcmu_runner_fails_too"]:
        suite, name = test.split(".", 1)
        assert re.search(rf"{suite}\.[^|]*\b{name}\b", listed), f"{test} fails through TCMU and is not in the README"
    print(log)


def test_vagrantfile_validates() -> None:
    """`vagrant validate` passes on the two-machine Vagrantfile, provider settings included (vagrant-libvirt makes
    libvirt the provider it checks against; no VM is started)."""
    assert shutil.which("vagrant"), "vagrant is missing: `make test` installs vagrant and vagrant-libvirt"
    done = subprocess.run(
        ["vagrant", "validate"], cwd=ROOT / "vagrant", capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "VAGRANT_DEFAULT_PROVIDER": "libvirt"},
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
