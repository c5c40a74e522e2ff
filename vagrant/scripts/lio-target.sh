#!/bin/bash
# Start san as an LIO target (san serve --frontend lio) and give it a pool, a vdisk and zoned hosts.
# Used as is by the QEMU harness (vagrant/qemu_vm.py) and by the Vagrant target machine's provisioning.
# Settings (environment): SAN_DIR (the checkout), SAN_DATA, PORTAL, TARGET_IQN, POOL_SIZE, VDISK_SIZE, THICK=1,
# BLOCK_SIZE, INITIATORS (space-separated IQNs zoned read-write), READONLY_INITIATORS (zoned read-only).
set -euo pipefail
SAN_DIR=${SAN_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
SAN_DATA=${SAN_DATA:-/var/lib/san}
PORTAL=${PORTAL:-127.0.0.1:3260}
TARGET_IQN=${TARGET_IQN:-iqn.2003-01.org.san:vm}
POOL_SIZE=${POOL_SIZE:-8G}
VDISK_SIZE=${VDISK_SIZE:-4G}
BLOCK_SIZE=${BLOCK_SIZE:-512}
INITIATORS=${INITIATORS:-$(sed -n 's/^InitiatorName=//p' /etc/iscsi/initiatorname.iscsi 2>/dev/null || true)}
READONLY_INITIATORS=${READONLY_INITIATORS:-}
API=http://127.0.0.1:8080
SAN="$SAN_DIR/.venv/bin/san"

for m in configfs target_core_mod target_core_user iscsi_target_mod; do modprobe "$m"; done
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
mkdir -p "$SAN_DATA"
"$SAN" serve --frontend lio --data "$SAN_DATA" --portal "$PORTAL" --iqn "$TARGET_IQN" \
    >"$SAN_DATA/serve.log" 2>&1 &
echo $! >"$SAN_DATA/serve.pid"
for _ in $(seq 120); do
    "$SAN" --api $API pool list >/dev/null 2>&1 && break
    kill -0 "$(cat "$SAN_DATA/serve.pid")" 2>/dev/null || { cat "$SAN_DATA/serve.log"; exit 1; }
    sleep 0.5
done
"$SAN" --api $API pool list >/dev/null
if ! "$SAN" --api $API vdisk show disk0 >/dev/null 2>&1; then
    "$SAN" --api $API pool create pool0 --size "$POOL_SIZE"
    "$SAN" --api $API vdisk create disk0 --pool pool0 --size "$VDISK_SIZE" --block-size "$BLOCK_SIZE" ${THICK:+--thick}
    n=0
    for iqn in $INITIATORS; do
        "$SAN" --api $API host create "host$n" --iqn "$iqn"
        "$SAN" --api $API zone add "host$n" disk0 --lun 0
        n=$((n + 1))
    done
    for iqn in $READONLY_INITIATORS; do
        "$SAN" --api $API host create "host$n" --iqn "$iqn"
        "$SAN" --api $API zone add "host$n" disk0 --lun 0 --read-only
        n=$((n + 1))
    done
fi
echo "san: LIO target $TARGET_IQN on $PORTAL serving disk0 ($VDISK_SIZE)"
