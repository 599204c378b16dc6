#!/bin/bash
# Prints the path of a cached Debian bookworm root with systemd and workqd's
# dependencies, building it with debootstrap on first use. The cache is keyed by
# everything that shapes the root, so a changed package list builds a new one;
# callers must work on a copy or overlay of it, never on the root itself.
set -euo pipefail

SUITE=bookworm
PACKAGES=systemd,systemd-sysv,dbus,procps,netbase,python3,python3-pika,python3-yaml,python3-prometheus-client,python3-sdnotify
CACHE=${WORKQD_SYSTEST_CACHE:-/var/cache/workqd-systest}

# The Debian mirror apt already uses here (deb822 or one-line sources).
mirror() {
    local uri
    uri=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
              /etc/apt/sources.list.d/*.list 2>/dev/null \
          | grep -v -e security -e '\[.*\]' | grep -oE 'https?://[^ ]+/debian/?' | head -n1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

MIRROR=$(mirror)
KEY=$(printf '%s\n' "$SUITE" "$PACKAGES" "$MIRROR" minbase v2 | sha256sum | cut -c1-16)
ROOT=$CACHE/$KEY/root

if [ ! -x "$ROOT/lib/systemd/systemd" ]; then
    mkdir -p "$CACHE/$KEY"
    tmp=$(mktemp -d "$CACHE/$KEY/build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "building the $SUITE root in $ROOT (once; about a minute)" >&2
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp/root" "$MIRROR" \
        >"$tmp/debootstrap.log" 2>&1 || { tail -n 30 "$tmp/debootstrap.log" >&2; exit 1; }
    # Quiet, fast boots: no getty, no login prompt, no first-boot questions.
    systemctl --root="$tmp/root" mask console-getty.service getty@.service \
        systemd-firstboot.service >/dev/null 2>&1 || true
    echo workqd-test >"$tmp/root/etc/hostname"
    # What the installer writes on a real server; minbase has no /etc/hosts.
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tworkqd-test\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        >"$tmp/root/etc/hosts"
    mv "$tmp/root" "$ROOT"
    rm -rf "$tmp"
    trap - EXIT
fi
echo "$ROOT"
