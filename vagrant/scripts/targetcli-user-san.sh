#!/bin/bash
# Stock targetcli (Debian's targetcli-fb) beside san serve --frontend lio: user:san is listed under /backstores with
# its cfgstring help; `create ... cfgstring=pool=pool0` makes a vdisk that is served (written and read back through
# open-iscsi, and again after the vdisk is renamed and san restarts: its cfgstring is bound to the vdisk); bad
# cfgstrings, a taken name and a second object for a served vdisk are refused with nothing changed; san's own object
# deleted by hand comes back; a vdisk deleted in san takes its storage object along; san-targetcli shows /san beside
# /backstores and /iscsi.
set -euo pipefail
SAN_DIR=${SAN_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
SCRIPTS="$SAN_DIR/vagrant/scripts"
SAN="$SAN_DIR/.venv/bin/san --api http://127.0.0.1:8080"
CORE=/sys/kernel/config/target/core
. "$SCRIPTS/iscsi-lib.sh"
fail() { echo "FAIL: $*"; exit 1; }
objects() { ls -d $CORE/user_*/"$1" 2>/dev/null | wc -l; }
san_targetcli() { PYTHONPATH="$SAN_DIR:$SAN_DIR/targetcli-ext" python3 -m san_shell.targetcli "$@"; }

# the system bus, with san's policy alone (tcmu-runner's file would let any daemon of that name in)
rm -f /etc/dbus-1/system.d/tcmu-runner.conf
install -m 0644 "$SAN_DIR/systemd/san-dbus.conf" /etc/dbus-1/system.d/san.conf
mkdir -p /run/dbus
dbus-daemon --system --fork
"$SCRIPTS/lio-target.sh"
grep -q "user:san is on the system bus" "$SAN_DATA/serve.log" || fail "san did not take org.kernel.TCMUService1"

listing=$(targetcli ls /backstores)
echo "$listing"
grep -q "user:san" <<<"$listing" || fail "targetcli does not list user:san"
targetcli /backstores/user:san help create | grep -q "pool=<pool>: san makes a thin vdisk" || fail "no cfgstring help"

# a vdisk made through targetcli, served
targetcli /backstores/user:san create name=vm1 size=64M cfgstring=pool=pool0
$SAN vdisk show vm1 --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
assert (v["pool"], v["size_bytes"], v["block_size"], v["thin"]) == ("pool0", 64 << 20, 512, True), v
print("vdisk vm1:", v["pool"], v["size_bytes"], "bytes, thin")'
$SAN zone add host0 vm1 --lun 1
start_iscsid
login default 127.0.0.1:3260 >/dev/null
lun_disk() {
    for _ in $(seq 100); do
        disk=$(iscsiadm -m session -P 3 | awk '/Lun: 1$/ { want = 1 } want && /Attached scsi disk/ { print $4; exit }')
        [ -n "$disk" ] && [ -b "/dev/$disk" ] && { echo "$disk"; return 0; }
        sleep 0.2
    done
    return 1
}
disk=$(lun_disk) || fail "LUN 1 (vm1) did not appear"
head -c 1048576 /dev/urandom >/var/tmp/vm1.data
dd if=/var/tmp/vm1.data of=/dev/$disk bs=1M count=1 oflag=direct status=none
readback() { dd if=/dev/$disk of=/var/tmp/vm1.back bs=1M count=1 iflag=direct status=none; cmp /var/tmp/vm1.back /var/tmp/vm1.data; }
readback || fail "vm1 read back differs"
echo "vm1 written and read back through /dev/$disk"
logout default
vm1_id=$($SAN vdisk show vm1 --json | python3 -c 'import json, sys; v = json.load(sys.stdin); print(v["id"], v["serial"])')
read -r vm1_id vm1_serial <<<"$vm1_id"
binding="pool=pool0;vdisk=$vm1_id;serial=$vm1_serial"
for _ in $(seq 50); do grep -q "Config: san/$binding " $CORE/user_*/vm1/info && break; sleep 0.2; done
grep -q "Config: san/$binding " $CORE/user_*/vm1/info || fail "vm1 is not bound to its vdisk: $(cat $CORE/user_*/vm1/info)"
echo "vm1's cfgstring is bound: $binding"

# refused: nothing made, in LIO or in san
before=$($SAN vdisk list --noheadings | wc -l)
for cfg in pool=nope size=1G; do
    out=$(targetcli /backstores/user:san create name=bad size=64M cfgstring=$cfg 2>&1 || true)
    echo "cfgstring=$cfg: $out"
    grep -q "cfgstring invalid: " <<<"$out" || fail "cfgstring=$cfg was not refused by CheckConfig"
done
out=$(targetcli /backstores/user:san create name=disk0 size=64M cfgstring=pool=pool0 2>&1 || true)
echo "name disk0 again: $out"
grep -q "creation failed" <<<"$out" || fail "a second disk0 was made"
[ "$(objects bad)" = 0 ] || fail "a storage object 'bad' is in LIO"
[ "$(objects disk0)" = 1 ] || fail "disk0 has $(objects disk0) storage objects"
out=$(targetcli /backstores/user:san create name=vm1b size=64M "cfgstring=$binding" 2>&1 || true)
echo "a second object for vm1: $out"
grep -q "creation failed" <<<"$out" || fail "a second storage object serves vm1"
[ "$(objects vm1b)" = 0 ] || fail "a storage object 'vm1b' is in LIO"
[ "$($SAN vdisk list --noheadings | wc -l)" = "$before" ] || fail "a refused create changed san's vdisks"
$SAN vdisk show bad >/dev/null 2>&1 && fail "vdisk bad exists"
echo "refused cfgstrings and a taken name changed nothing"

# san's own object, deleted by hand, comes back (the controller says disk0 is there)
targetcli /backstores/user:san delete disk0
for _ in $(seq 100); do [ "$(objects disk0)" = 1 ] && break; sleep 0.2; done
[ "$(objects disk0)" = 1 ] || fail "disk0's storage object did not come back"
grep -q "Config: san/1 " $CORE/user_*/disk0/info || fail "disk0 came back as $(cat $CORE/user_*/disk0/info)"
echo "disk0's storage object, deleted in targetcli, came back"

# the admin's object outlives a rename and a san restart (san takes its device over by its binding: same data)
$SAN vdisk rename vm1 vm1-renamed
"$SCRIPTS/lio-stop.sh"
[ "$(objects vm1)" = 1 ] || fail "san's clean stop removed the admin's user:san/vm1"
"$SCRIPTS/lio-target.sh"
login default 127.0.0.1:3260 >/dev/null
disk=$(lun_disk) || fail "LUN 1 (vm1) did not come back"
readback || fail "vm1 differs after restart"
echo "vm1 served again after it was renamed and san restarted, same data"
logout default
$SAN vdisk rename vm1-renamed vm1

# deleted in san: its storage object goes too
targetcli /backstores/user:san create name=vm2 size=32M cfgstring=pool=pool0
[ "$(objects vm2)" = 1 ] || fail "no storage object vm2"
$SAN vdisk delete vm2
for _ in $(seq 50); do [ "$(objects vm2)" = 0 ] && break; sleep 0.2; done
[ "$(objects vm2)" = 0 ] || fail "vm2's storage object outlived its vdisk"
echo "vm2 deleted in san, its storage object went with it"

tree=$(san_targetcli ls /)
echo "$tree"
for node in backstores iscsi san; do grep -q "o- $node " <<<"$tree" || fail "san-targetcli shows no /$node"; done
san_targetcli ls /san/vdisks | grep -q "o- vm1 " || fail "san-targetcli /san/vdisks has no vm1"
echo "targetcli-user-san: ok"
