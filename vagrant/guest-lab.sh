#!/bin/sh
# Install the lab's role scripts and the `hybridlink-lab-role` command in a
# VM (runs as root from the Vagrantfile, with the role's settings in the
# environment: ROLE, LAB, RELAY_IP, APP_IP, ONPREM_IP, RELAY_APP_SIDE_IP,
# RELAY_ONPREM_SIDE_IP, LAB_STATE, HYBRIDLINK, SERVICES).
set -eu
dest=/opt/hybridlink-lab/provision
if [ -d /tmp/hybridlink-provision ]; then
    rm -rf "$dest"
    mkdir -p "$(dirname "$dest")"
    mv /tmp/hybridlink-provision "$dest"
    chown -R root:root "$dest"
fi

env_file=/etc/hybridlink-lab.env
: >"$env_file"
for v in ROLE LAB RELAY_IP APP_IP ONPREM_IP RELAY_APP_SIDE_IP RELAY_ONPREM_SIDE_IP \
         LAB_STATE HYBRIDLINK SERVICES; do
    eval "val=\${$v:-}"
    printf "%s='%s'\n" "$v" "$val" >>"$env_file"
done

cat >/usr/local/sbin/hybridlink-lab-role <<'SH'
#!/bin/sh
# hybridlink-lab-role [VAR=VALUE...]: run this VM's lab role script
# (/opt/hybridlink-lab/provision/$ROLE.sh) as root with the settings in
# /etc/hybridlink-lab.env, plus or overridden by the given assignments
# (e.g. SEND_STRINGS=..., LISTEN_STRINGS=...). Its output and exit status
# are the script's.
set -eu
set -a
. /etc/hybridlink-lab.env
set +a
for a in "$@"; do
    case "$a" in
    *=*) export "$a" ;;
    *) echo "hybridlink-lab-role: not VAR=VALUE: $a" >&2; exit 2 ;;
    esac
done
script=/opt/hybridlink-lab/provision/$ROLE.sh
[ -f "$script" ] || { echo "hybridlink-lab-role: no $script" >&2; exit 1; }
exec sh "$script"
SH
chmod 0755 /usr/local/sbin/hybridlink-lab-role
echo "lab: $ROLE ready: sudo hybridlink-lab-role runs $dest/$ROLE.sh"
