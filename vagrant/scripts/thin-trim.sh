#!/bin/bash
# Thin provisioning through LIO: a new ext4 on a thin vdisk allocates only what it writes, files allocate about their
# size, and fstrim (UNMAP) gives the space back. Runs where the target's API is reachable. Arguments: PORTAL VDISK.
set -euo pipefail
. "$(dirname "$0")/iscsi-lib.sh"
PORTAL=${1:-127.0.0.1:3260}
VDISK=${2:-disk0}
SAN="${SAN_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}/.venv/bin/san"
MNT=/mnt/san-thin
MiB=1048576
allocated() {
    sync
    sleep 1
    "$SAN" vdisk show "$VDISK" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["allocated_bytes"])'
}
start_iscsid
disk=$(login default "$PORTAL")
size=$(blockdev --getsize64 /dev/$disk)
before=$(allocated)
mkfs.ext4 -q -F /dev/$disk
mkdir -p $MNT
mount -o nodiscard /dev/$disk $MNT
fresh=$(allocated)
echo "vdisk $((size / MiB)) MiB: allocated $((before / MiB)) MiB before mkfs, $((fresh / MiB)) MiB after"
[ "$fresh" -lt $((size / 10)) ] || { echo "FAIL: a fresh file system allocated over 10% of the vdisk"; exit 1; }
head -c $((256 * MiB)) /dev/urandom >$MNT/data
full=$(allocated)
grew=$(((full - fresh) / MiB))
echo "256 MiB file: allocated grew by $grew MiB"
[ $grew -ge 256 ] && [ $grew -le 320 ] || { echo "FAIL: expected 256-320 MiB more"; exit 1; }
rm $MNT/data
sync  # the freed blocks are free for fstrim once the journal has committed
fstrim -v $MNT
trimmed=$(allocated)
echo "after rm + fstrim: allocated $((trimmed / MiB)) MiB"
[ $(((full - trimmed) / MiB)) -ge 240 ] || { echo "FAIL: fstrim gave back less than 240 MiB"; exit 1; }
umount $MNT
fsck.ext4 -f -n /dev/$disk >/dev/null
logout default
echo "thin-trim: ok"
