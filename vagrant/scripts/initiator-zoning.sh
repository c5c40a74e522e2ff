#!/bin/bash
# Zoning as the kernel initiator sees it: an initiator name the target does not know sees no LUN, and a host zoned
# read-only gets a write-protected disk (its writes fail). Arguments: PORTAL READER_IQN [STRANGER_IQN].
set -euo pipefail
. "$(dirname "$0")/iscsi-lib.sh"
PORTAL=${1:-127.0.0.1:3260}
READER=${2:?the initiator name zoned read-only}
STRANGER=${3:-iqn.2026-11.org.san.test:stranger}
start_iscsid

make_iface stranger "$STRANGER"
if iscsiadm -m discovery -t sendtargets -p "$PORTAL" -I stranger >/dev/null 2>&1 &&
    iscsiadm -m node -T "$TARGET_IQN" -p "$PORTAL" -I stranger --login >/dev/null 2>&1; then
    if disk=$(session_disk stranger); then
        echo "FAIL: unknown initiator $STRANGER sees /dev/$disk"
        exit 1
    fi
    logout stranger
    echo "unknown initiator logged in but sees no LUN"
else
    echo "unknown initiator $STRANGER refused"
fi

make_iface reader "$READER"
disk=$(login reader "$PORTAL")
head -c 4096 /dev/$disk >/dev/null
if dd if=/dev/zero of=/dev/$disk bs=4096 count=1 oflag=direct status=none 2>/dev/null; then
    echo "FAIL: a write to the read-only LUN /dev/$disk succeeded"
    exit 1
fi
echo "read-only zone: reads work, writes fail (blockdev --getro: $(blockdev --getro /dev/$disk))"
logout reader
echo "initiator-zoning: ok"
