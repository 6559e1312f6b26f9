#!/bin/sh
# Lab addressing beyond what Vagrant configures (runs as root in the VM).
# Env: ROLE, RELAY_IP, RELAY_APP_SIDE_IP, RELAY_ONPREM_SIDE_IP. Idempotent.
set -eu

case "$ROLE" in
relay)
    ip addr replace "$RELAY_IP/32" dev lo
    # The relay must not route between its two sides.
    sysctl -qw net.ipv4.ip_forward=0
    ;;
app)
    ip route replace "$RELAY_IP/32" via "$RELAY_APP_SIDE_IP"
    ;;
onprem)
    ip route replace "$RELAY_IP/32" via "$RELAY_ONPREM_SIDE_IP"
    ;;
*)
    echo "net.sh: unknown ROLE '$ROLE'" >&2
    exit 1
    ;;
esac
echo "net.sh: $ROLE: $(ip -4 -o addr show | awk '$2 != "eth0" {print $2, $4}' | tr '\n' ' ')"
