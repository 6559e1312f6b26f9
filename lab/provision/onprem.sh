#!/bin/sh
# Lab role "onprem": the real servers (a web server by name and by IPv4
# literal, PostgreSQL, Redis) and the agent that serves the lab's hybrid
# connections. Needs: ONPREM_IP, LISTEN_STRINGS (listen connection strings,
# one per line); BIG_MIB (optional, 256) sizes the file for the throughput
# figure.
. "$(dirname "$0")/common.sh"
: "${ONPREM_IP:?}" "${LISTEN_STRINGS:?}"

# The on-prem names resolve here only: the app side never learns them.
for name in payroll.corp sql.corp cache.corp stopped.corp; do
    add_host 127.0.0.1 "$name"
done

site=$LAB_STATE/site
mkdir -p "$site"
echo "payroll page from on-prem" >"$site/index.html"
# A sparse file for the throughput figure (BIG_MIB MiB).
truncate -s "${BIG_MIB:-256}M" "$site/big.bin"
daemon web python3 -m http.server --bind 127.0.0.1 80 --directory "$site"
daemon web-literal python3 -m http.server --bind "$ONPREM_IP" 8080 --directory "$site"

pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
pg=$LAB_STATE/postgres
if [ ! -d "$pg/data" ]; then
    mkdir -p "$pg"
    chown postgres "$pg"
    su postgres -s /bin/sh -c "$pgbin/initdb --no-sync -A trust -U postgres -D $pg/data" >"$LAB_STATE/initdb.log" 2>&1
fi
daemon postgres su postgres -s /bin/sh -c \
    "exec $pgbin/postgres -D $pg/data -k $pg -c listen_addresses=127.0.0.1 -p 5432"
daemon redis redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no
wait_for "the web server" 20 curl -sf http://127.0.0.1:80/
wait_for "PostgreSQL" 30 pg_isready -q -h 127.0.0.1 -p 5432 -U postgres
wait_for "Redis" 20 redis-cli -h 127.0.0.1 ping

if [ "$SERVICES" = systemd ]; then
    # The agent's unit and its on-prem policy: exactly the endpoints the
    # relay names now. No end-to-end keys, as the app side has none.
    set --
    for cs in $LISTEN_STRINGS; do set -- "$@" --connection-string "$cs"; done
    "$HYBRIDLINK" agent install "$@" --no-end-to-end >"$LAB_STATE/install.log"
    socket=/run/hybridlink-agent/agent.sock
else
    # The on-prem policy, as `agent install` writes it: exactly the endpoints
    # the relay names now; whatever the relay says later, nothing else.
    socket=$LAB_STATE/agent.sock
    set --
    for cs in $LISTEN_STRINGS; do set -- "$@" --endpoint-of "$cs"; done
    "$HYBRIDLINK" agent allow "$@" --policy "$LAB_STATE/policy.toml" \
        --status-socket "$socket" >"$LAB_STATE/policy.log"
    HYBRIDLINK_CONNECTION_STRING=$LISTEN_STRINGS daemon agent "$HYBRIDLINK" agent run \
        --status-socket "$socket" --label onprem --policy "$LAB_STATE/policy.toml"
fi
connected() {
    "$HYBRIDLINK" agent status --status-socket "$socket" --json >"$LAB_STATE/status.json" &&
        ! grep -q '"reconnecting"\|"denied"' "$LAB_STATE/status.json"
}
wait_for "the agent" 20 connected
