#!/bin/sh
# Install edge-daemon as a systemd service, or remove it. Idempotent: run it again to upgrade.
#
#   sudo systemd/install.sh                 install into /opt/edge-daemon, enable and start
#   sudo systemd/install.sh --uninstall     stop, disable, remove the program (keeps /etc/edge-daemon)
#   sudo systemd/install.sh --uninstall --purge   ... and remove /etc/edge-daemon too
#
# Options: --no-enable (install only), --root DIR (install under DIR, for packaging and tests),
# --source SPEC (what pip installs; default: this checkout). PIP_ARGS adds pip options.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
source_spec=$(dirname "$here")
root=""
enable=yes
action=install
purge=no
while [ $# -gt 0 ]; do
    case "$1" in
        --uninstall) action=uninstall ;;
        --purge) purge=yes ;;
        --no-enable) enable=no ;;
        --root) root=$2; shift ;;
        --source) source_spec=$2; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

prefix="$root/opt/edge-daemon"
etc="$root/etc/edge-daemon"
units="$root/etc/systemd/system"
have_systemctl() { [ -z "$root" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; }

if [ "$action" = uninstall ]; then
    if have_systemctl; then
        systemctl disable --now edge-daemon.service 2>/dev/null || true
    fi
    rm -f "$units/edge-daemon.service" "$units/edge-daemon@.service"
    if have_systemctl; then
        systemctl daemon-reload
    fi
    rm -rf "$prefix"
    if [ "$purge" = yes ]; then
        rm -rf "$etc"
        echo "edge-daemon removed, with its settings"
    else
        echo "edge-daemon removed; settings kept in $etc"
    fi
    exit 0
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "install.sh: edge-daemon needs Python 3.11 or newer ($python is older)" >&2; exit 1; }
mkdir -p "$prefix"
[ -x "$prefix/venv/bin/python" ] || "$python" -m venv "$prefix/venv"
# shellcheck disable=SC2086 # PIP_ARGS is a list of options
"$prefix/venv/bin/python" -m pip install --quiet --upgrade ${PIP_ARGS:-} "$source_spec"

install -d -m 0755 "$etc"
if [ ! -e "$etc/edge-daemon.env" ]; then
    install -m 0640 "$source_spec/config/edge-daemon.env.example" "$etc/edge-daemon.env"
fi
if [ ! -e "$etc/mqtt-password" ]; then
    # Loaded with LoadCredential=; empty means no password. Readable by root alone.
    install -m 0600 /dev/null "$etc/mqtt-password"
fi
install -d -m 0755 "$units"
install -m 0644 "$here/edge-daemon.service" "$here/edge-daemon@.service" "$units/"

if have_systemctl; then
    systemctl daemon-reload
    if [ "$enable" = yes ]; then
        systemctl enable --now edge-daemon.service
        systemctl restart edge-daemon.service
    fi
fi
echo "edge-daemon installed in $prefix; settings: $etc/edge-daemon.env; password: $etc/mqtt-password"
