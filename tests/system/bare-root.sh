#!/bin/bash
# Prints the path of a cached Debian root as a fresh server has it, building it
# with debootstrap on first use: minbase plus what boots it (systemd, dbus),
# nothing of workqd's. tests/system/front-door.sh runs `make run` and
# `make test`'s set-up in it, which must install the rest themselves.
#
#   tests/system/bare-root.sh [bookworm|trixie]      (default bookworm)
#
# Cached under /var/cache/workqd-systest (or $WORKQD_SYSTEST_CACHE), keyed by
# what shapes the root; callers work on an overlay or copy, never on the root.
set -euo pipefail

SUITE=${1:-bookworm}
case $SUITE in
    bookworm|trixie) ;;
    *) echo "bare-root.sh: unknown suite $SUITE (bookworm or trixie)" >&2; exit 2 ;;
esac
PACKAGES=systemd,systemd-sysv,dbus
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
KEY=bare-$SUITE-$(printf '%s\n' "$SUITE" "$PACKAGES" "$MIRROR" minbase v1 | sha256sum | cut -c1-12)
ROOT=$CACHE/$KEY/root

mkdir -p "$CACHE/$KEY"
exec 9>"$CACHE/$KEY/lock"
flock 9
if [ ! -x "$ROOT/lib/systemd/systemd" ]; then
    tmp=$(mktemp -d "$CACHE/$KEY/build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "building the bare $SUITE root in $ROOT (once; about a minute)" >&2
    t0=$SECONDS
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp/root" "$MIRROR" \
        >"$tmp/debootstrap.log" 2>&1 || { tail -n 30 "$tmp/debootstrap.log" >&2; exit 1; }
    # Quiet, fast boots: no getty, no first-boot questions, no apt timers.
    systemctl --root="$tmp/root" mask console-getty.service getty@.service \
        systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1 || true
    echo workqd-bare >"$tmp/root/etc/hostname"
    # What the installer writes on a real server; minbase writes no /etc/hosts,
    # and without one "localhost" (the default broker URL) does not resolve.
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tworkqd-bare\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        >"$tmp/root/etc/hosts"
    rm -f "$tmp/root"/var/cache/apt/archives/*.deb
    echo "debootstrap $SUITE took $((SECONDS - t0))s" >&2
    mv "$tmp/root" "$ROOT"
    rm -rf "$tmp"
    trap - EXIT
fi
echo "$ROOT"
