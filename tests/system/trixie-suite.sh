#!/bin/bash
# The behaviour suite on Debian 13 trixie's stack: Python 3.13 with
# trixie's python3-pika, python3-prometheus-client, python3-sdnotify and
# python3-yaml, against trixie's own RabbitMQ 4.0.
#
#   tests/system/trixie-suite.sh [PYTEST-ARGUMENT...]
#
# Boots an overlay of the cached trixie root (tests/system/rootfs.sh trixie)
# with a private network, so its rabbitmq-server listens on its own
# 127.0.0.1:5672 (the URL tests/conftest.py uses) and never meets the host's
# broker. The source tree is bind-mounted read-only at /src; pytest writes only
# below /tmp. Runs /usr/bin/python3 -m pytest -W error::DeprecationWarning on
# the behaviour tests (or the given arguments), then lists every warning the
# daemons it started printed (their logs, PYTHONWARNINGS=always).
#
# Tests that fail on RabbitMQ 4.0 because of workqd's own code are listed in
# tests/system/trixie-known-failures and deselected, so the default run stays
# green; WORKQ_TRIXIE_STRICT=1 runs them too. Exits with pytest's status.
# Needs root.
set -uo pipefail

top=$(cd "$(dirname "$0")/../.." && pwd)
here=$top/tests/system
# shellcheck source=tests/system/lib.sh
. "$here/lib.sh"

TESTS=(tests/integration/test_tasks.py tests/integration/test_faults.py
       tests/integration/test_metrics.py tests/integration/test_reload.py
       tests/integration/test_submit.py tests/integration/test_config.py
       tests/integration/test_broker_loss.py tests/integration/test_quorum_limits.py
       tests/integration/test_queues.py tests/integration/test_master.py
       tests/integration/test_hostile.py tests/integration/test_handlers.py
       tests/unit/test_settle.py tests/unit/test_intake.py tests/unit/test_slots.py
       tests/unit/test_handler.py tests/unit/test_worker.py tests/unit/test_pool.py
       tests/unit/test_state.py tests/unit/test_broker.py tests/unit/test_session.py
       tests/unit/test_service.py tests/unit/test_frames.py tests/unit/test_policy.py
       tests/unit/test_delays.py tests/integration/test_frames.py
       tests/integration/test_time_worker.py tests/integration/test_client.py)
KNOWN=$here/trixie-known-failures
WORK=

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
log() { printf '== trixie: %s\n' "$*" >&2; }

cleanup() {
    ct_shutdown
    [ -n "$WORK" ] && rm -rf "$WORK"
}

if [ "$(id -u)" != 0 ]; then
    echo "tests/system/trixie-suite.sh needs root (debootstrap, systemd-nspawn, mount)" >&2
    exit 2
fi
for tool in systemd-nspawn debootstrap; do
    command -v "$tool" >/dev/null || { echo "trixie-suite.sh: $tool is missing (apt-get install systemd-container debootstrap)" >&2; exit 2; }
done

WORK=$(mktemp -d /var/tmp/workqd-trixie.XXXXXX)
trap cleanup EXIT
trap 'exit 130' INT TERM

t0=$(now)
lower=$(bash "$here/rootfs.sh" trixie) || { echo "trixie-suite.sh: no trixie root" >&2; exit 1; }
log "root ready in $(since "$t0")s: ${lower%/root}"
ct_make_root "$lower" "$WORK" || { echo "trixie-suite.sh: cannot prepare the root" >&2; exit 1; }
mkdir -p "$CT_ROOT/src"
t0=$(now)
ct_boot workqd-trixie-suite "$WORK/nspawn.log" --private-network --bind-ro="$top:/src" \
    || { echo "trixie-suite.sh: the container did not boot:" >&2; tail -n 20 "$WORK/nspawn.log" >&2; exit 1; }
log "booted in $(since "$t0")s: $(ct systemctl --version | head -n1 | cut -d' ' -f1-3)"
t0=$(now)
if ! ct rabbitmqctl await_startup --timeout 120 >/dev/null 2>&1 </dev/null; then
    echo "trixie-suite.sh: RabbitMQ did not start in the container" >&2
    ct journalctl -u rabbitmq-server --no-pager -n 30 >&2
    exit 1
fi
log "RabbitMQ $(ct rabbitmqctl version 2>/dev/null </dev/null) up $(since "$t0")s after the boot"
log "$(ct python3 -c 'import sys, pika, prometheus_client, yaml, importlib.metadata as m
print("Python", sys.version.split()[0], "pika", pika.__version__, "prometheus-client",
      m.version("prometheus-client"), "sdnotify", m.version("sdnotify"), "PyYAML", yaml.__version__)')"

args=("$@")
[ ${#args[@]} -gt 0 ] || args=("${TESTS[@]}")
deselect=()
if [ "${WORKQ_TRIXIE_STRICT:-0}" != 1 ]; then
    while read -r id _; do
        deselect+=(--deselect "$id")
    done < <(grep -v -e '^#' -e '^[[:space:]]*$' "$KNOWN")
    log "deselected $((${#deselect[@]} / 2)) known failure(s) from $KNOWN (WORKQ_TRIXIE_STRICT=1 runs them)"
fi

t0=$(now)
# In parallel, as on the host (pytest-xdist; tests/conftest.py keeps the tests that share
# a throwaway node in one worker, and lets those that stop the broker run alone): the
# tests mostly wait on the broker and their daemons, and run one by one they were the
# longest job of the whole CI run. WORKQ_TRIXIE_JOBS=0 runs them in one process.
jobs=${WORKQ_TRIXIE_JOBS:-2}
# The daemons the tests start inherit PYTHONWARNINGS: they print every
# DeprecationWarning into their logs, which are listed below. In the tests
# themselves a DeprecationWarning is an error (pytest's -W, which its xdist workers
# apply too), except one of pika 1.3.2's: its AMQP timestamp decoding calls
# datetime.utcfromtimestamp(), deprecated since Python 3.12, and any dead-lettered
# message (x-death) has a timestamp.
ct bash -c "cd /src && env PYTHONDONTWRITEBYTECODE=1 PYTHONWARNINGS=always::DeprecationWarning HOME=/root \
    python3 -m pytest -W error::DeprecationWarning \
    -W 'ignore:datetime.datetime.utcfromtimestamp:DeprecationWarning:pika.data' \
    -p no:cacheprovider --basetemp=/tmp/pytest -o addopts=-ra \
    -n $jobs --dist loadgroup --durations=15 \
    $(printf '%q ' "${args[@]}" "${deselect[@]}") | tee /tmp/pytest.out; exit \${PIPESTATUS[0]}" </dev/null
status=$?
log "pytest exited $status after $(since "$t0")s"

# A failed test's daemon logs die with the container: show their ends.
# pytest names a test's directory after the test, cut to 30 characters, below the
# xdist worker's own (popen-gwN) when there are workers.
for name in $(ct sed -n 's/^FAILED [^:]*::\([^ []*\).*/\1/p' /tmp/pytest.out | sort -u); do
    for f in $(ct bash -c "ls /tmp/pytest/${name:0:30}[0-9]*/d*/workqd.log /tmp/pytest/popen-gw*/${name:0:30}[0-9]*/d*/workqd.log 2>/dev/null"); do
        log "last lines of $f:"
        ct tail -n 25 "$f" >&2
    done
done

log "warnings in the $(ct find /tmp/pytest -name workqd.log | wc -l) daemons' logs (count, where, what; none if empty):"
ct bash -c 'find /tmp/pytest -name workqd.log -print0 | xargs -0 -r grep -h "Warning:" \
            | sed -E -e "s/^.*\/(usr|src)\//\/\1\//" -e "s/pid=[0-9]+/pid=N/" | sort | uniq -c | sort -rn | head -n 40' >&2
exit $status
