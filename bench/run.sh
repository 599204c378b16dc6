#!/usr/bin/env bash
# The benchmark suite, end to end:
#   bash bench/run.sh           full suite (about 12 minutes on 2 cores):
#                               writes bench/RESULTS.md and bench/results.png
#   bash bench/run.sh --smoke   tiny sizes, one run each, no Celery/Dramatiq (about 1 minute):
#                               writes bench/out/RESULTS-smoke.md
# Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and python3 (3.11+) with venv.
# It creates its venvs under bench/ (reused while their requirements are unchanged):
#   .venv-bench   bookworm's pika 1.2.0 and prometheus-client 0.16.0, workqd, matplotlib, py-spy
#   .venv-pika    workqd with the current pika and prometheus-client from PyPI
#   .venv-others  Celery and Dramatiq with their RabbitMQ brokers (not workqd's dependencies)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BENCH=$ROOT/bench
PYTHON=${PYTHON:-python3}
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
START=$(date +%s)

# mkvenv DIR PACKAGE... : (re)creates DIR when the package list changed, installs workqd
# editable unless the list says "no-workqd".
mkvenv() {
    local dir=$1; shift
    local want stamp
    want=$(printf '%s\n' "$PYTHON" "$@" | sha1sum | cut -c1-12)
    stamp="$dir/.bench-installed-$want"
    if [[ -f "$stamp" ]]; then
        return
    fi
    echo "bench: creating $dir" >&2
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    local pkgs=() workqd=1
    for p in "$@"; do
        if [[ "$p" == no-workqd ]]; then workqd=0; else pkgs+=("$p"); fi
    done
    "$dir/bin/pip" install -q --disable-pip-version-check "${pkgs[@]}" 2>"$dir/pip.log" \
        || { cat "$dir/pip.log" >&2; exit 1; }
    if [[ $workqd == 1 ]]; then
        "$dir/bin/pip" install -q --disable-pip-version-check --no-deps -e "$ROOT" \
            2>>"$dir/pip.log" || { cat "$dir/pip.log" >&2; exit 1; }
    fi
    touch "$stamp"
}

mkvenv "$BENCH/.venv-bench" "pika==1.2.0" "PyYAML==6.0" "sdnotify==0.3.1" \
    "prometheus-client==0.16.0" matplotlib py-spy
mkvenv "$BENCH/.venv-pika" pika PyYAML sdnotify prometheus-client
ARGS=(--py12 "$BENCH/.venv-bench/bin/python" --pynew "$BENCH/.venv-pika/bin/python")
if [[ $SMOKE == 0 ]]; then
    mkvenv "$BENCH/.venv-others" celery "dramatiq[rabbitmq]" no-workqd
    ARGS+=(--others "$BENCH/.venv-others/bin/python")
fi
echo "bench: venvs ready after $(( $(date +%s) - START ))s" >&2

PY="$BENCH/.venv-bench/bin/python"
mkdir -p "$BENCH/out"
status=0
if [[ $SMOKE == 1 ]]; then
    "$PY" "$BENCH/suite.py" "${ARGS[@]}" --smoke --out "$BENCH/out/results-smoke.json" || status=$?
    "$PY" "$BENCH/report.py" "$BENCH/out/results-smoke.json" --md "$BENCH/out/RESULTS-smoke.md" \
        --png "$BENCH/out/results-smoke.png"
else
    "$PY" "$BENCH/suite.py" "${ARGS[@]}" --out "$BENCH/out/results.json" || status=$?
    cp "$BENCH/out/results.json" "$BENCH/results.json"
    "$PY" "$BENCH/report.py" "$BENCH/results.json" --md "$BENCH/RESULTS.md" \
        --png "$BENCH/results.png"
fi
echo "bench: done in $(( $(date +%s) - START ))s (status $status)" >&2
exit $status
