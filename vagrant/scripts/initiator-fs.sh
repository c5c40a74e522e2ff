#!/bin/bash
# The kernel initiator on a san LUN: ext4 on it, a tree of files with known checksums, fsck, remount, verify,
# log out, log in again, verify. Argument: the target's portal (default 127.0.0.1:3260).
set -euo pipefail
. "$(dirname "$0")/iscsi-lib.sh"
PORTAL=${1:-127.0.0.1:3260}
MNT=/mnt/san-fs
start_iscsid
disk=$(login default "$PORTAL")
echo "logged in: /dev/$disk ($(blockdev --getsize64 /dev/$disk) bytes)"
mkfs.ext4 -q -F /dev/$disk
mkdir -p $MNT
mount /dev/$disk $MNT
mkdir -p $MNT/tree/a/b $MNT/tree/c
n=0
for size in 1 4 511 4096 65536 1000000 4194304 16777216; do
    for dir in tree tree/a tree/a/b tree/c; do
        head -c $size /dev/urandom >$MNT/$dir/file-$n-$size
        n=$((n + 1))
    done
done
(cd $MNT && find tree -type f | sort | xargs sha256sum) >/tmp/manifest
echo "wrote $n files, $(du -sm $MNT/tree | cut -f1) MiB"
umount $MNT
fsck.ext4 -f -n /dev/$disk
mount /dev/$disk $MNT
(cd $MNT && sha256sum --quiet -c /tmp/manifest)
echo "verified after remount"
umount $MNT
logout default
disk=$(login default "$PORTAL")
mount /dev/$disk $MNT
(cd $MNT && sha256sum --quiet -c /tmp/manifest)
echo "verified after logging in again (/dev/$disk)"
umount $MNT
logout default
echo "initiator-fs: ok"
