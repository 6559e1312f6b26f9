#!/bin/sh
# Lab role "relay": run the relay (`hybridlink relay serve`, or the unit of
# `relay install`) and create the lab's hybrid connections. Prints one line
# per connection string the other roles need:
#   send NAME STRING
#   listen NAME STRING
# Needs: RELAY_IP (the address or name written into connection strings),
# ONPREM_IP.
#
# A node of a relay cluster also needs (SERVICES=processes only):
#   RELAY_NODE     this node's number, 1 to the number of nodes
#   ETCD_IPS       the etcd members' addresses, node N's member the Nth;
#                  this node's member listens on its own one
#   ADVERTISE_IP   the address agents and senders dial for this node (one
#                  of the addresses RELAY_IP resolves to)
#   CERT_FROM      (nodes 2 and up) a directory holding node 1's cert.pem
#                  and key.pem, copied into this node's data dir before its
#                  first start: every node presents the one certificate the
#                  connection strings pin
#   ETCD_ONLY=yes  start this node's etcd member and return; the members
#                  answer once a majority runs, so every node's member is
#                  started before any relay node waits for etcd
# Node 1 creates the hybrid connections and prints the strings; the other
# nodes print nothing.
. "$(dirname "$0")/common.sh"
: "${RELAY_IP:?}" "${ONPREM_IP:?}"
api=http://127.0.0.1:9444
data=$LAB_STATE/data
set --

if [ -n "${RELAY_NODE:-}" ]; then
    : "${ETCD_IPS:?}" "${ADVERTISE_IP:?}"
    if [ "$SERVICES" = systemd ]; then
        echo "lab: a relay cluster runs its nodes as processes only (relay install has no --registry)" >&2
        exit 1
    fi
    own=$(echo $ETCD_IPS | cut -d ' ' -f "$RELAY_NODE")
    members=
    endpoints=
    n=1
    for ip in $ETCD_IPS; do
        members="$members${members:+,}node$n=http://$ip:2380"
        endpoints="$endpoints${endpoints:+,}$ip:2379"
        n=$((n + 1))
    done
    daemon etcd etcd --name "node$RELAY_NODE" --data-dir "$LAB_STATE/etcd" \
        --listen-client-urls "http://$own:2379" --advertise-client-urls "http://$own:2379" \
        --listen-peer-urls "http://$own:2380" --initial-advertise-peer-urls "http://$own:2380" \
        --initial-cluster "$members" --initial-cluster-token hybridlink-lab \
        --initial-cluster-state new --logger zap --log-level warn \
        --auto-compaction-mode periodic --auto-compaction-retention 1h
    [ "${ETCD_ONLY:-}" = yes ] && exit 0
    healthy() { curl -sf "http://$own:2379/health" | grep -q '"health":"true"'; }
    wait_for "etcd" 30 healthy
    if [ "$RELAY_NODE" != 1 ] && [ ! -e "$data/cert.pem" ]; then
        : "${CERT_FROM:?nodes after the first need node 1's certificate}"
        mkdir -p "$data"
        chmod 700 "$data"
        cp "$CERT_FROM/cert.pem" "$CERT_FROM/key.pem" "$data/"
        chmod 600 "$data/cert.pem" "$data/key.pem"
    fi
    set -- --registry "etcd://$endpoints" --advertise "$ADVERTISE_IP:9443"
fi

if [ "$SERVICES" = systemd ]; then
    # On the port a relay on the internet uses, below 1024: its user keeps
    # the one capability that takes. The unit is of Type=notify, so the
    # relay is ready when `install` returns.
    "$HYBRIDLINK" relay install --data-dir "$data" --listen 0.0.0.0:443 \
        --api 127.0.0.1:9444 --public-host "$RELAY_IP" >"$LAB_STATE/install.log"
else
    ready() { grep -q cert_sha256 "$LAB_STATE/relay.log"; }
    daemon relay "$HYBRIDLINK" relay serve --data-dir "$data" \
        --listen 0.0.0.0:9443 --api 127.0.0.1:9444 --public-host "$RELAY_IP" "$@"
    wait_for "the relay" 20 ready
fi
[ "${RELAY_NODE:-1}" = 1 ] || exit 0

hc() { "$HYBRIDLINK" hc --api "$api" --data-dir "$data" "$@"; }
# name host port: a web page by name, PostgreSQL, Redis, the web server by
# IPv4 literal (no DNS involved), and a port nothing listens on.
for spec in "payroll payroll.corp 80" "sql sql.corp 5432" "cache cache.corp 6379" \
    "literal $ONPREM_IP 8080" "stopped stopped.corp 81"; do
    # shellcheck disable=SC2086
    set -- $spec
    hc show "$1" >/dev/null 2>&1 || hc create "$1" --host "$2" --port "$3" >/dev/null
    echo "send $1 $(hc keys "$1" --rule send --key primary)"
    echo "listen $1 $(hc keys "$1" --rule listen --key primary)"
done
