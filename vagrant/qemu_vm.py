#!/usr/bin/env python3
"""Run a command in a throw-away VM: Debian's kernel under QEMU (TCG) with LIO, TCMU and iSCSI modules loaded, this
machine's root shared read-only (9p + tmpfs overlay); the command's exit status, log and console come back."""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("SAN_VM_CACHE", "/var/tmp/san-vm"))
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko || echo "insmod $m failed"; done
mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=524288 host /host || exec sh
mount -t tmpfs -o size=32g tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot || exec sh
for d in proc sys dev; do mount --move /$d /newroot/$d; done
mkdir -p /newroot/vmout
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 out /newroot/vmout
exec chroot /newroot /bin/sh /vmout/stage2.sh
"""
STAGE2 = r"""#!/bin/sh
# Runs in the guest's root (the host's, overlaid): set the machine up, run the job, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /run
mkdir -p /run/lock/iscsi /var/tmp
ip link set lo up
hostname san-vm
for m in configfs target_core_mod target_core_file target_core_user iscsi_target_mod iscsi_tcp sd_mod; do
    modprobe $m || echo "modprobe $m failed" >/dev/console
done
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
cd {cwd}
{env}
sh -c {command} >/vmout/job.log 2>&1 </dev/null
echo $? >/vmout/rc
sync
echo o >/proc/sysrq-trigger
sleep 30
"""


def kernel_release() -> str:
    """The newest Debian amd64 kernel with its modules installed here."""
    found = []
    for path in glob.glob("/boot/vmlinuz-*-amd64"):
        release = path.removeprefix("/boot/vmlinuz-")
        if os.path.isdir(f"/lib/modules/{release}/kernel/drivers/target"):
            found.append(release)
    if not found:
        raise SystemExit("no Debian kernel with LIO modules: apt-get install linux-image-amd64")
    return max(found, key=lambda r: [int(x) if x.isdigit() else 0 for x in re.split(r"[.-]", r)])


def module_closure(release: str, names: tuple[str, ...]) -> list[str]:
    """Module paths (relative to /lib/modules/<release>) for names and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    with open(f"/lib/modules/{release}/modules.dep") as table:
        for line in table:
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
    by_name = {os.path.basename(p).split(".ko")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps[path]:
            visit(dep)
        order.append(path)

    for name in names:
        visit(by_name[name])
    return order


def initramfs(release: str) -> Path:
    """A busybox initramfs that mounts the host's root over 9p (built once per kernel and cached)."""
    digest = hashlib.sha256(INIT.encode()).hexdigest()[:12]
    target = CACHE / f"initramfs-{release}-{digest}.cpio.gz"
    if target.exists():
        return target
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("no busybox: apt-get install busybox-static")
    CACHE.mkdir(parents=True, exist_ok=True)
    modules = module_closure(release, BOOT_MODULES)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "modules"):
            (root / d).mkdir()
        shutil.copy(busybox, root / "bin/busybox")
        names = []
        for path in modules:
            name = os.path.basename(path).split(".ko")[0]
            shutil.copy(f"/lib/modules/{release}/{path}", root / "modules" / f"{name}.ko")
            names.append(name)
        (root / "modules.order").write_text("\n".join(names) + "\n")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        listing = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
        archive = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=listing.encode(), capture_output=True, check=True
        ).stdout
    partial = target.with_suffix(".tmp")
    partial.write_bytes(gzip.compress(archive))
    partial.rename(target)
    return target


def run(command: str, out: Path, cwd: str, env: dict[str, str], memory: str, cpus: int, timeout: float) -> int:
    """Boot, run command in the guest (through sh -c, in cwd), return its exit status (124 on timeout)."""
    release = kernel_release()
    initrd = initramfs(release)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("rc", "job.log", "console.log"):
        (out / stale).unlink(missing_ok=True)
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    (out / "stage2.sh").write_text(STAGE2.format(cwd=shlex.quote(cwd), env=exports, command=shlex.quote(command)))
    qemu = [
        "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", str(cpus), "-m", memory,
        "-kernel", f"/boot/vmlinuz-{release}", "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
        "-display", "none", "-no-reboot", "-nic", "none", "-serial", f"file:{out / 'console.log'}",
        "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={out},mount_tag=out,security_model=none",
    ]  # fmt: skip
    started = time.monotonic()
    with subprocess.Popen(qemu, stdin=subprocess.DEVNULL) as vm:
        try:
            vm.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            vm.kill()
            vm.wait()
            print(f"qemu_vm: timed out after {timeout:.0f} s", file=sys.stderr)
            return 124
    elapsed = time.monotonic() - started
    rc_file = out / "rc"
    if not rc_file.exists():
        print(f"qemu_vm: the guest stopped without a result after {elapsed:.0f} s; see {out / 'console.log'}",
              file=sys.stderr)  # fmt: skip
        return 125
    print(f"qemu_vm: guest ran {elapsed:.0f} s", file=sys.stderr)
    return int(rc_file.read_text().strip() or 125)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="", help="directory for job.log, console.log and rc (default: a new temp dir)")
    parser.add_argument("--memory", default="4G", help="guest memory (default 4G)")
    parser.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before the VM is killed (default 1200)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="set in the guest's job")
    parser.add_argument("command", nargs="+", help="the command to run in the guest (in the current directory)")
    args = parser.parse_args()
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--env wants NAME=VALUE, not {item!r}")
        env[name] = value
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="san-vm-"))
    rc = run(shlex.join(args.command), out, os.getcwd(), env, args.memory, args.cpus, args.timeout)
    log = out / "job.log"
    if log.exists():
        sys.stdout.write(log.read_text(errors="replace"))
    print(f"qemu_vm: exit status {rc}; logs in {out}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
