#!/bin/bash
# A bench script on Debian 13 trixie's stack, against trixie's own RabbitMQ 4.0:
#
#   bench/trixie.sh python3 bench/delays.py [ARGUMENT...]
#
# Boots the container tests/system/trixie-suite.sh boots (an overlay of the cached
# trixie root, tests/system/rootfs.sh trixie, with a private network, so its broker
# listens on its own 127.0.0.1:5672, the bench's default URL), runs the command in
# /src (this tree, bind-mounted read-only; the bench writes below /tmp only) and
# powers the container off. Prints the RabbitMQ, Python and pika versions first.
# Exits with the command's status. Needs root.
set -uo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=tests/system/lib.sh
. "$top/tests/system/lib.sh"
WORK=

cleanup() {
    ct_shutdown
    [ -n "$WORK" ] && rm -rf "$WORK"
}

[ $# -gt 0 ] || { echo "usage: bench/trixie.sh COMMAND [ARGUMENT...]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "bench/trixie.sh needs root (systemd-nspawn, mount)" >&2; exit 2; }
WORK=$(mktemp -d /var/tmp/workqd-trixie-bench.XXXXXX)
trap cleanup EXIT
trap 'exit 130' INT TERM

lower=$(bash "$top/tests/system/rootfs.sh" trixie) || { echo "bench/trixie.sh: no trixie root" >&2; exit 1; }
ct_make_root "$lower" "$WORK" || { echo "bench/trixie.sh: cannot prepare the root" >&2; exit 1; }
mkdir -p "$CT_ROOT/src"
ct_boot "workqd-trixie-bench-$$" "$WORK/nspawn.log" --private-network --bind-ro="$top:/src" \
    || { echo "bench/trixie.sh: the container did not boot:" >&2; tail -n 20 "$WORK/nspawn.log" >&2; exit 1; }
if ! ct rabbitmqctl await_startup --timeout 120 >/dev/null 2>&1 </dev/null; then
    echo "bench/trixie.sh: RabbitMQ did not start in the container" >&2
    exit 1
fi
echo "== trixie: RabbitMQ $(ct rabbitmqctl version 2>/dev/null </dev/null), $(ct python3 -c \
    'import sys, pika; print("Python", sys.version.split()[0], "pika", pika.__version__)')" >&2
ct bash -c "cd /src && env PYTHONDONTWRITEBYTECODE=1 HOME=/root $(printf '%q ' "$@")" </dev/null
