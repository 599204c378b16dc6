#!/bin/bash
# Prints the path of a cached Debian root with systemd and workqd's
# dependencies, building it with debootstrap on first use.
#
#   tests/system/rootfs.sh [bookworm|trixie] [bare]     (default bookworm)
#
# bare: a root as a fresh server has it, minbase plus what boots it (systemd,
#   dbus) and nothing of workqd's; tests/system/front-door.sh runs `make run`
#   and `make test`'s set-up in it, which must install the rest themselves.
#
# bookworm: the daemon's dependencies only; its container shares the host's
#   network and broker.
# trixie: also rabbitmq-server (its container has a private network and runs
#   its own broker), pytest, pytest-xdist and hypothesis for the behaviour suite, and
#   trixie's lintian. A private network reaches no archive, so everything the
#   runs need is installed here.
#
# The cache (/var/cache/workqd-systest, or $WORKQD_SYSTEST_CACHE) is keyed by
# everything that shapes the root, so a changed package list builds a new one;
# callers must work on a copy or overlay of it, never on the root itself.
set -euo pipefail

SUITE=${1:-bookworm}
BARE=${2:-}
LATER=
HOST=workqd-test
BASE=systemd,systemd-sysv,dbus,procps,netbase,python3,python3-pika,python3-yaml,python3-prometheus-client,python3-sdnotify
case $SUITE in
    bookworm) PACKAGES=$BASE ;;
    trixie) PACKAGES=$BASE,rabbitmq-server,python3-pytest,python3-pytest-xdist,python3-hypothesis,python3-venv
            # debootstrap cannot order lintian's perl dependencies; apt can.
            LATER=lintian ;;
    *) echo "rootfs.sh: unknown suite $SUITE (bookworm or trixie)" >&2; exit 2 ;;
esac
case $BARE in
    bare) PACKAGES=systemd,systemd-sysv,dbus LATER= HOST=workqd-bare ;;
    '') ;;
    *) echo "rootfs.sh: unknown variant $BARE (bare or none)" >&2; exit 2 ;;
esac
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
if [ -n "$BARE" ]; then
    KEY=bare-$SUITE-$(printf '%s\n' "$SUITE" "$PACKAGES" "$MIRROR" minbase v1 | sha256sum | cut -c1-12)
else
    KEY=$SUITE-$(printf '%s\n' "$SUITE" "$PACKAGES" "$LATER" "$MIRROR" minbase v3 | sha256sum | cut -c1-12)
fi
ROOT=$CACHE/$KEY/root

mkdir -p "$CACHE/$KEY"
# One build at a time per root: tests/run.sh builds both roots ahead, in the
# background, and a run that needs one meanwhile waits here for it.
exec 9>"$CACHE/$KEY/lock"
flock 9
if [ ! -x "$ROOT/lib/systemd/systemd" ]; then
    tmp=$(mktemp -d "$CACHE/$KEY/build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "building the $SUITE ${BARE:+bare }root in $ROOT (once; about a minute)" >&2
    t0=$SECONDS
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp/root" "$MIRROR" \
        >"$tmp/debootstrap.log" 2>&1 || { tail -n 30 "$tmp/debootstrap.log" >&2; exit 1; }
    if [ -n "$LATER" ]; then
        # In a throwaway container on the host's network, before any boot.
        systemd-nspawn -q -D "$tmp/root" --register=no --keep-unit \
            env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            ${LATER//,/ } >>"$tmp/debootstrap.log" 2>&1 </dev/null \
            || { tail -n 30 "$tmp/debootstrap.log" >&2; exit 1; }
        systemd-nspawn -q -D "$tmp/root" --register=no --keep-unit apt-get clean \
            >>"$tmp/debootstrap.log" 2>&1 </dev/null
    fi
    # Quiet, fast boots: no getty, no login prompt, no first-boot questions,
    # no apt timers reaching for the network.
    systemctl --root="$tmp/root" mask console-getty.service getty@.service \
        systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1 || true
    echo "$HOST" >"$tmp/root/etc/hostname"
    # What the installer writes on a real server; minbase has no /etc/hosts,
    # and without one "localhost" (the default broker URL) does not resolve.
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$HOST" \
        >"$tmp/root/etc/hosts"
    rm -f "$tmp/root"/var/cache/apt/archives/*.deb
    echo "debootstrap $SUITE took $((SECONDS - t0))s" >&2
    mv "$tmp/root" "$ROOT"
    rm -rf "$tmp"
    trap - EXIT
fi
echo "$ROOT"
