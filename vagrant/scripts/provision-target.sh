#!/bin/bash
# Vagrant provisioning of the target machine: build san from the synced checkout, then start it on LIO.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends make python3 python3-venv python3-dev gcc kmod
make -C /vagrant venv
SAN_DIR=/vagrant /vagrant/vagrant/scripts/lio-target.sh
