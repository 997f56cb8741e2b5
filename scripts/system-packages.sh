#!/usr/bin/env bash
# The Debian packages the tests use, installed if missing; `make test` runs this first.
#   mosquitto, mosquitto-clients  private brokers with TLS and passwords (mosquitto_passwd)
#   openssl                       test certificates
#   systemd                       systemd-analyze (the unit's security score)
#   python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-good
#                                 GStreamer's RTSP server under Debian's Python (an RTSP camera
#                                 on loopback, tests/rtsp_server.py)
#   chromium, chromium-driver     the labelling page's test in a real headless browser
# Nothing missing: exits 0 at once (dpkg-query only). Missing, as root: apt-get installs them.
# Missing, not root: prints the one command to run and exits 1.
set -euo pipefail

packages=(
    mosquitto mosquitto-clients openssl systemd
    python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good
    chromium chromium-driver
)

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "system-packages: no dpkg-query, so not Debian or Ubuntu; install the equivalents of" \
        "${packages[*]} yourself, then run make lint test-main test-tflite soak" >&2
    exit 1
fi

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q ' installed$' || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "system-packages: missing Debian packages the tests need; install them with:" >&2
    echo "sudo apt-get install ${missing[*]}" >&2
    exit 1
fi

echo "system-packages: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
