#!/bin/sh
# Lab role "relay": run the relay (`hybridlink relay serve`, or the unit of
# `relay install`) and create the lab's hybrid connections. Prints one line per connection string the other roles need:
#   send NAME STRING
#   listen NAME STRING
# Needs: RELAY_IP (the address written into connection strings), ONPREM_IP.
. "$(dirname "$0")/common.sh"
: "${RELAY_IP:?}" "${ONPREM_IP:?}"
api=http://127.0.0.1:9444

if [ "$SERVICES" = systemd ]; then
    # On the port a relay on the internet uses, below 1024: its user keeps
    # the one capability that takes. The unit is of Type=notify, so the
    # relay is ready when `install` returns.
    "$HYBRIDLINK" relay install --data-dir "$LAB_STATE/data" --listen 0.0.0.0:443 \
        --api 127.0.0.1:9444 --public-host "$RELAY_IP" >"$LAB_STATE/install.log"
else
    ready() { grep -q cert_sha256 "$LAB_STATE/relay.log"; }
    daemon relay "$HYBRIDLINK" relay serve --data-dir "$LAB_STATE/data" \
        --listen 0.0.0.0:9443 --api 127.0.0.1:9444 --public-host "$RELAY_IP"
    wait_for "the relay" 20 ready
fi

hc() { "$HYBRIDLINK" hc --api "$api" --data-dir "$LAB_STATE/data" "$@"; }
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
