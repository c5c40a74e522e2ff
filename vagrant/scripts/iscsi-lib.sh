# Helpers for the initiator scripts (sourced): log in with open-iscsi and find the disk a session attached.
TARGET_IQN=${TARGET_IQN:-iqn.2003-01.org.san:vm}

start_iscsid() {
    mkdir -p /run/lock/iscsi
    pgrep -x iscsid >/dev/null || iscsid
}

# login IFACE PORTAL: discovery and login through an iface (its initiator name); prints the attached disk (sdX)
login() {
    local iface=$1 portal=$2
    iscsiadm -m discovery -t sendtargets -p "$portal" -I "$iface" >/dev/null
    iscsiadm -m node -T "$TARGET_IQN" -p "$portal" -I "$iface" --login >/dev/null
    session_disk "$iface"
}

# session_disk IFACE: the disk of the session through IFACE (waits for the SCSI scan)
session_disk() {
    local iface=$1 disk=""
    for _ in $(seq 100); do
        disk=$(iscsiadm -m session -P 3 2>/dev/null | awk -v want="$iface" '
            /Iface Name:/ { current = $3 }
            /Attached scsi disk/ && current == want { print $4; exit }')
        [ -n "$disk" ] && [ -b "/dev/$disk" ] && { echo "$disk"; return 0; }
        sleep 0.2
    done
    return 1
}

logout() {
    iscsiadm -m node -T "$TARGET_IQN" -I "$1" --logout >/dev/null
}

# make_iface NAME INITIATOR_IQN: an open-iscsi iface that logs in under another initiator name
make_iface() {
    iscsiadm -m iface -I "$1" -o new >/dev/null 2>&1 || true
    iscsiadm -m iface -I "$1" -o update -n iface.initiatorname -v "$2" >/dev/null
}
