#!/bin/sh
# Lab role "app": the appliance, so that unmodified clients here reach the
# on-prem servers by name. Needs: SEND_STRINGS (send connection strings, one
# per line).
. "$(dirname "$0")/common.sh"
: "${SEND_STRINGS:?}"

if [ "$SERVICES" = systemd ]; then
    set --
    for cs in $SEND_STRINGS; do set -- "$@" --connection-string "$cs"; done
    "$HYBRIDLINK" appliance install "$@" >"$LAB_STATE/install.log"
else
    config=$LAB_STATE/appliance.toml
    {
        echo "state_dir = \"$LAB_STATE/appliance\""
        echo "connection_strings = ["
        echo "$SEND_STRINGS" | while IFS= read -r cs; do
            [ -n "$cs" ] && echo "  \"$cs\","
        done
        echo "]"
    } >"$config"
    daemon appliance "$HYBRIDLINK" appliance run --config "$config"
fi
resolves() { getent hosts payroll.corp | grep -q '^127\.77\.'; }
wait_for "the appliance" 30 resolves
