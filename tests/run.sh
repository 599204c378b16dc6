#!/usr/bin/env bash
# The whole test suite, as CI runs it (`make test`): installs what the tests
# need, makes sure RabbitMQ answers on 127.0.0.1:5672, then runs pytest twice:
# on Debian bookworm's library versions (what the .deb depends on) and on the
# current PyPI releases. The first run includes the system tests, which boot
# containers: the .deb under bookworm's and trixie's systemd
# (tests/system/test_system.py) and the behaviour suite on trixie's Python 3.13,
# python3-* packages and RabbitMQ 4.0 (tests/system/test_trixie.py), and the
# cluster tests on throwaway RabbitMQ nodes (tests/cluster).
#
# Tests run in parallel (pytest-xdist: WORKQD_TEST_JOBS workers, 7, on bookworm's
# versions, WORKQD_TEST_JOBS_LATEST, 2, on the current releases): the
# containers and the cluster start first and run beside the integration tests;
# tests/conftest.py keeps the tests that share a throwaway node's fixed port in
# one worker and lets the tests that stop the machine's broker run alone.
# Extra arguments go to both pytest runs (e.g. tests/unit, -x, -n 0).
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
    # pytest 9.2 stopped honouring pytest-xdist 3.8's xdist_group (the tests sharing a
    # throwaway node's fixed port would run in two workers at once; conftest.py refuses).
    # Flask only for the test that runs docs/client.md's example view as written.
    "$dir/bin/pip" install -q "$@" "pytest<9.2" pytest-xdist hypothesis flask >/dev/null
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

# Both runs go at once: the bookworm run's containers and cluster take most of its
# time, and the other run's tests fill the waits. In the bookworm run five workers hold
# the long jobs (two system tests, the trixie suite, the cluster's and the special
# nodes' groups) while the others take the integration and unit tests; --no-loadscope-reorder keeps the collection order
# (tests/conftest.py), which starts the long work first. Tests that need the machine's
# broker to themselves wait for the other run's tests through tests/conftest.py's lock.
# Each run ends with its 15 slowest tests; the second run's output follows the first's.
PARALLEL=(--dist loadgroup --no-loadscope-reorder --durations=15)
logs=$(mktemp -d "${TMPDIR:-/tmp}/workqd-tests.XXXXXX")

log "pytest on current PyPI releases, in the background (without the system and cluster tests, which use Debian's packages and throwaway nodes)"
# The master's state machine runs on fakes, whatever the library versions: its full
# 1,500 sequences (a minute of CPU alone, five beside the rest of CI) run once, in the
# first run, and 300 here.
WORKQ_MASTER_EXAMPLES=${WORKQ_MASTER_EXAMPLES_LATEST:-300} \
    .venv-latest/bin/python -m pytest -n "${WORKQD_TEST_JOBS_LATEST:-2}" "${PARALLEL[@]}" \
    -m "not system and not cluster" "$@" >"$logs/latest" 2>&1 &
latest_pid=$!
trap 'kill "$latest_pid" 2>/dev/null || true; rm -rf "$logs"' EXIT

bookworm=0
log "pytest on $RELEASE's versions (full suite, with the system tests on bookworm and trixie)"
".venv-$RELEASE/bin/python" -m pytest -n "${WORKQD_TEST_JOBS:-7}" "${PARALLEL[@]}" "$@" \
    | tee "$logs/bookworm" || bookworm=$?

latest=0
wait "$latest_pid" || latest=$?
log "pytest on current PyPI releases (without the system and cluster tests), run beside the first:"
cat "$logs/latest"

# The closing lines: each run's own pytest summary line.
summary() { grep -E '^=+ .* in [0-9.]+s.* =+$' "$1" | tail -n 1; }
log "$RELEASE's versions (exit $bookworm):"
summary "$logs/bookworm"
log "current PyPI releases (exit $latest):"
summary "$logs/latest"
exit $(( bookworm != 0 || latest != 0 ))
