#!/bin/bash
# Kill -9 san's TCMU handler while a file system on its LUN is being written, start it again (LIO keeps the device:
# the new handler resets the ring and in-flight commands are retried), then check every file and fsck.
# Runs on the target machine with the initiator logged in from the same machine. Argument: PORTAL.
set -euo pipefail
HERE=$(dirname "$0")
. "$HERE/iscsi-lib.sh"
PORTAL=${1:-127.0.0.1:3260}
SAN_DATA=${SAN_DATA:-/var/lib/san}
MNT=/mnt/san-restart
start_iscsid
disk=$(login default "$PORTAL")
mkfs.ext4 -q -F /dev/$disk
mkdir -p $MNT
mount /dev/$disk $MNT
(
    for i in $(seq 60); do
        head -c 262144 /dev/urandom >$MNT/f$i
        [ $((i % 10)) = 0 ] && sync
        sleep 0.1
    done
) &
writer=$!
sleep 2
kill -9 "$(cat "$SAN_DATA/serve.pid")"
echo "handler killed with I/O running"
sleep 1
"$HERE/lio-target.sh" >/dev/null
taken=$(grep -c 'serving tcm-user' "$SAN_DATA/serve.log" || true)
[ "$taken" -ge 1 ] || { echo "FAIL: the new handler took over no device"; exit 1; }
echo "handler started again: $taken device(s) taken over"
wait $writer
(cd $MNT && sha256sum f* >/tmp/restart.sums)
sync
umount $MNT
echo 3 >/proc/sys/vm/drop_caches
fsck.ext4 -f -n /dev/$disk >/dev/null
mount /dev/$disk $MNT
(cd $MNT && sha256sum --quiet -c /tmp/restart.sums)
echo "$(ls $MNT | wc -l) files intact, fsck clean"
umount $MNT
logout default
echo "handler-restart: ok"
