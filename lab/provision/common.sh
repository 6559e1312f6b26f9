# Shared by the lab's role scripts (sourced, not run). The same scripts
# provision the network-namespace lab (`hybridlink lab up`) and the VMs of
# vagrant/: the caller sets LAB_STATE (this role's directory), HYBRIDLINK
# (the binary) and SERVICES, and the role's own variables.
#
# RELAY_NAME and RELAY_ADDRESSES (optional, a relay cluster): the relay's
# name resolves here to each of the addresses (one per node), as a name
# with one DNS record per node does.
#
# SERVICES says how hybridlink's roles run: "processes" (the default), in
# the background of the script (see daemon below), as namespaces have no
# init system; or "systemd", as the units `hybridlink ROLE install` writes,
# as on a real host (the VMs).
set -eu
: "${LAB_STATE:?LAB_STATE must name this role's state directory}"
: "${HYBRIDLINK:=hybridlink}"
: "${SERVICES:=processes}"
mkdir -p "$LAB_STATE"

# alive PID: the process runs (a killed one nobody has reaped yet, a
# zombie, does not).
alive() {
    [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -c1)" != Z ]
}

# daemon NAME CMD...: start CMD in its own session with its output in
# $LAB_STATE/NAME.log, unless the one started last time still runs.
daemon() {
    name=$1
    shift
    if [ -s "$LAB_STATE/$name.pid" ] && alive "$(cat "$LAB_STATE/$name.pid")"; then
        return 0
    fi
    # Emptied here, not by the background job: a wait for a line in the
    # log must not see the line of a process started earlier.
    : >"$LAB_STATE/$name.log"
    setsid "$@" >>"$LAB_STATE/$name.log" 2>&1 </dev/null &
    echo $! >"$LAB_STATE/$name.pid"
}

# wait_for WHAT SECONDS CMD...: retry CMD every 0.2 s until it succeeds.
wait_for() {
    what=$1
    tries=$(($2 * 5))
    shift 2
    while ! "$@" >/dev/null 2>&1; do
        tries=$((tries - 1))
        if [ "$tries" -le 0 ]; then
            echo "lab: $what did not come up; its logs:" >&2
            tail -n 20 "$LAB_STATE"/*.log >&2 || true
            if [ "$SERVICES" = systemd ]; then
                journalctl --no-pager -n 20 -u 'hybridlink-*' >&2 || true
            fi
            exit 1
        fi
        sleep 0.2
    done
}

# add_host IP NAME: make NAME resolve to IP on this machine.
add_host() {
    grep -q "[[:space:]]$2\$" /etc/hosts || echo "$1 $2" >>/etc/hosts
}

# add_address IP NAME: make NAME resolve to IP too on this machine.
add_address() {
    grep -q "^$1[[:space:]]$2\$" /etc/hosts || echo "$1 $2" >>/etc/hosts
}

if [ -n "${RELAY_ADDRESSES:-}" ]; then
    for address in $RELAY_ADDRESSES; do
        add_address "$address" "${RELAY_NAME:?RELAY_NAME must name the relay}"
    done
fi
