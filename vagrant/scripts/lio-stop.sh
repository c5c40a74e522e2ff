#!/bin/bash
# Stop san (SIGTERM) and check that it took its LIO objects away and left everyone else's (an admin's user:san too).
set -euo pipefail
SAN_DATA=${SAN_DATA:-/var/lib/san}
TARGET_IQN=${TARGET_IQN:-iqn.2003-01.org.san:vm}
pid=$(cat "$SAN_DATA/serve.pid")
kill -TERM "$pid"
for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$pid" 2>/dev/null; then echo "FAIL: san did not stop"; exit 1; fi
grep -q "san stopped cleanly" "$SAN_DATA/serve.log" || { echo "FAIL: no clean stop"; tail "$SAN_DATA/serve.log"; exit 1; }
if [ -e "/sys/kernel/config/target/iscsi/$TARGET_IQN" ]; then echo "FAIL: target $TARGET_IQN left in LIO"; exit 1; fi
# san's own objects name a vdisk id (san/<id>); those an admin made in targetcli (san/pool=...) stay, as the admin's
if grep -lsE 'Config: san/[0-9]+([^0-9]|$)' /sys/kernel/config/target/core/user_*/*/info 2>/dev/null | grep -q .; then
    echo "FAIL: a san storage object was left in LIO"; exit 1
fi
echo "lio-stop: san stopped and removed its LIO objects"
