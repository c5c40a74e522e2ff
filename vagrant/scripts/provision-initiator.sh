#!/bin/bash
# Vagrant provisioning of the initiator machine: open-iscsi under a fixed initiator name, then the checks the QEMU
# harness runs: a file system on the LUN, and zoning (an unknown name sees nothing, a read-only zone refuses writes).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends open-iscsi e2fsprogs
echo "InitiatorName=$INITIATOR_IQN" >/etc/iscsi/initiatorname.iscsi
systemctl restart iscsid
/vagrant/vagrant/scripts/initiator-fs.sh "$PORTAL"
/vagrant/vagrant/scripts/initiator-zoning.sh "$PORTAL" "$READER_IQN"
