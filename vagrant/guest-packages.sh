#!/bin/sh
# Make sure the packages the lab runs inside the VMs are present. The
# hybridlink-bookworm box (./build-box) already has them all, which matters
# because the lab VMs have no internet; a stock box (e.g. debian/bookworm64
# under VirtualBox on a workstation) gets them from its apt mirror here.
set -eu
pkgs="iproute2 iputils-ping curl ca-certificates python3 procps rsync
      postgresql postgresql-client redis-server redis-tools"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed \
        || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "guest-packages: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
# As in the box: the provisioning scripts start these when a role needs them.
systemctl disable --now postgresql.service redis-server.service >/dev/null 2>&1 || true
