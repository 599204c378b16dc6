#!/usr/bin/env bash
# The whole test suite, as CI runs it (`make test`): installs what the tests
# need, makes sure RabbitMQ answers on 127.0.0.1:5672, then runs pytest twice:
# on Debian bookworm's library versions (what the .deb depends on) and on the
# current PyPI releases. The first run includes the system tests, which boot
# containers: the .deb under bookworm's and trixie's systemd
# (tests/test_system.py) and the behaviour suite on trixie's Python 3.13,
# python3-* packages and RabbitMQ 4.0 (tests/test_trixie.py).
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(python3-venv rabbitmq-server prometheus systemd-container debootstrap
              debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
              lintian python3-pika python3-yaml python3-sdnotify python3-prometheus-client)
# Bookworm's versions: python3-pika 1.2.0, python3-prometheus-client 0.16.0,
# python3-sdnotify 0.3.1, python3-yaml 6.0.
BOOKWORM_PINS=(pika==1.2.0 prometheus-client==0.16.0 sdnotify==0.3.1 PyYAML==6.0)
# On trixie, trixie's: bookworm's PyYAML 6.0 does not build on Python 3.13.
TRIXIE_PINS=(pika==1.3.2 prometheus-client==0.21.1 sdnotify==0.3.2 PyYAML==6.0.2)
RELEASE=$(. /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-bookworm}")
case $RELEASE in
    trixie) PINS=("${TRIXIE_PINS[@]}") ;;
    *) RELEASE=bookworm PINS=("${BOOKWORM_PINS[@]}") ;;
esac

log() { printf '== %s\n' "$*" >&2; }

make_venv() {  # make_venv DIR PIP-ARGS...
    local dir=$1; shift
    if [ ! -x "$dir/bin/python" ]; then
        python3 -m venv "$dir"
        "$dir/bin/pip" install -q --upgrade pip >/dev/null
    fi
    "$dir/bin/pip" install -q "$@" pytest hypothesis >/dev/null
    # As a new user would: a regular (not editable) install of this tree.
    "$dir/bin/pip" install -q --force-reinstall --no-deps . >/dev/null
}

# The system tests' debootstrap roots take minutes on a cold cache and mostly
# wait for the archive: build both now, in the background, while the venvs and
# the first tests run (the system tests wait for them; rootfs.sh locks).
prebuild_roots() {
    [ "$(id -u)" = 0 ] && command -v debootstrap >/dev/null || return 0
    local suite
    for suite in bookworm trixie; do
        bash tests/system/rootfs.sh "$suite" >/dev/null 2>"${TMPDIR:-/tmp}/workqd-rootfs-$suite.log" &
    done
}

# The packages, and a broker on 127.0.0.1:5672 (installed and started when
# missing, as `make run` does it).
bash tools/local-setup.sh "${DEB_PACKAGES[@]}"
# A pytest selection needs no roots; the full suite does.
[ $# -gt 0 ] || prebuild_roots

log "venv with $RELEASE's versions: ${PINS[*]}"
make_venv ".venv-$RELEASE" "${PINS[@]}"
log "venv with current PyPI releases"
make_venv .venv-latest --upgrade pika prometheus-client sdnotify PyYAML

status=0
log "pytest on $RELEASE's versions (full suite, with the system tests on bookworm and trixie)"
".venv-$RELEASE/bin/python" -m pytest "$@" || status=$?
log "pytest on current PyPI releases (without the system test, which uses Debian's packages)"
.venv-latest/bin/python -m pytest -m "not system and not cluster" "$@" || status=$?
exit $status
