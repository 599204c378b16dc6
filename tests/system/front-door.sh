#!/bin/bash
# The README's two commands on a fresh Debian server: boots a bare root (what
# debootstrap's minbase and systemd give, nothing of workqd's) with a private
# network, so its broker never meets the host's, copies the source tree in,
# and as root there:
#   0. not root, tools/local-setup.sh installs nothing and fails with one line;
#   1. apt-get install make (the one step the README asks for first);
#   2. `make run` in the background: proves it installed and started
#      rabbitmq-server, that workqd logged "ready", and that a task submitted
#      with workq-submit --wait ran and succeeded; then stops workqd with TERM;
#   3. stops the container's broker and runs `make test`'s set-up with one
#      fast test (bash tests/run.sh tests/integration/test_tasks.py -k ...): proves it
#      starts the broker again, builds both venvs and runs pytest green.
# apt and pip reach the Debian archive and PyPI through a proxy listening on
# the container's loopback (tests/system/netns-proxy.py), and nothing else.
#
#   tests/system/front-door.sh [bookworm|trixie]...     (default: both)
#
# Needs root (debootstrap, systemd-nspawn, mount). Exits 0 when every check
# of every release passed; prints one "== front-door SUITE: ..." line per step.
set -uo pipefail

top=$(cd "$(dirname "$0")/../.." && pwd)
here=$top/tests/system
# shellcheck source=tests/system/lib.sh
. "$here/lib.sh"

PROXY_PORT=3128
ALLOWED_HOSTS=(deb.debian.org pypi.org files.pythonhosted.org)
FAST_TEST=test_round_robin_without_prefetch
SRC=/root/workqd          # where the tree lands in the container
WORK=
PROXY=
RUN=

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }
say() { printf '== front-door %s: %s\n' "$SUITE" "$*" >&2; }
fail() { say "FAILED: $*"; return 1; }

cleanup() {
    [ -n "$RUN" ] && kill -KILL "$RUN" 2>/dev/null
    ct_shutdown
    [ -n "$PROXY" ] && kill "$PROXY" 2>/dev/null && wait "$PROXY" 2>/dev/null
    PROXY= RUN=
    [ -n "$WORK" ] && rm -rf "$WORK"
    WORK=
}

# pip in the container trusts the certificates the host trusts: a network
# that inspects TLS on its way to PyPI is trusted there as it is here.
HOST_CA=/etc/ssl/certs/ca-certificates.crt
CT_CA=/usr/local/share/front-door-host-ca.crt

# inside COMMAND...: a root shell in the container, with the proxy in its environment.
inside() {
    nsenter -t "$CT_PID" -a env -i PATH="$CT_PATH" HOME=/root LANG=C.UTF-8 \
        SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 DEBIAN_FRONTEND=noninteractive \
        http_proxy="http://127.0.0.1:$PROXY_PORT" https_proxy="http://127.0.0.1:$PROXY_PORT" \
        no_proxy=127.0.0.1,localhost,::1 \
        ${HOST_CA_COPIED:+PIP_CERT=$CT_CA} "$@" </dev/null
}

# The pid of workqd's master: the first bin/workqd process, breadth first,
# below the job running `make run` (its workers are the master's children).
master_pid() {
    local queue=("$RUN") pid
    while [ ${#queue[@]} -gt 0 ]; do
        pid=${queue[0]}
        queue=("${queue[@]:1}")
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'bin/workqd -c'; then
            echo "$pid"
            return 0
        fi
        # shellcheck disable=SC2207
        queue+=($(cat /proc/"$pid"/task/*/children 2>/dev/null))
    done
    return 1
}

one_suite() {
    local lower t0 out pid status
    WORK=$(mktemp -d /var/tmp/workqd-front-door.XXXXXX)
    t0=$(now)
    lower=$(bash "$here/rootfs.sh" "$SUITE" bare) || fail "no bare $SUITE root" || return 1
    ct_make_root "$lower" "$WORK" || fail "cannot prepare the root" || return 1
    say "bare root ready in $(since "$t0")s: ${lower%/root}"
    # The tree as a clone has it: tracked files and new ones, not what is ignored.
    mkdir -p "$CT_ROOT$SRC"
    (cd "$top" && git ls-files -z -co --exclude-standard | tar -c --null -T - -f -) \
        | tar -x -C "$CT_ROOT$SRC" || fail "cannot copy the tree" || return 1

    HOST_CA_COPIED=
    if [ -r "$HOST_CA" ]; then
        mkdir -p "$CT_ROOT${CT_CA%/*}" && cp "$HOST_CA" "$CT_ROOT$CT_CA" && HOST_CA_COPIED=1
    fi
    t0=$(now)
    ct_boot "workqd-front-$SUITE" "$WORK/nspawn.log" --private-network \
        || { tail -n 20 "$WORK/nspawn.log" >&2; fail "the container did not boot"; return 1; }
    say "booted in $(since "$t0")s: $(ct systemctl --version | head -n1 | cut -d' ' -f1-2)"
    python3 "$here/netns-proxy.py" "$CT_PID" "$PROXY_PORT" "${ALLOWED_HOSTS[@]}" \
        >"$WORK/proxy.out" 2>"$WORK/proxy.log" &
    PROXY=$!
    poll 10 grep -q listening "$WORK/proxy.out" || fail "the proxy did not start" || return 1
    for pkg in rabbitmq-server python3 make; do
        ! ct dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || fail "$pkg is already installed in the bare root" || return 1
    done
    ct_private_network || fail "the container reaches the host's broker" || return 1
    say "fresh: no rabbitmq-server, python3 or make; the host's broker unreachable"
    # The script on stdin: nobody cannot read below /root.
    out=$(ct setpriv --reuid=65534 --regid=65534 --clear-groups \
              bash -s -- python3-venv 2>&1 <"$top/tools/local-setup.sh")
    status=$?
    [ $status = 1 ] && [[ $out == *"rabbitmq-server is not installed"* ]] \
        || fail "not root, local-setup.sh exited $status: $out" || return 1
    say "not root: local-setup.sh installs nothing, exit 1: ${out##*$'\n'}"

    t0=$(now)
    inside sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends make >/dev/null' \
        >"$WORK/apt-make.log" 2>&1 || { tail -n 20 "$WORK/apt-make.log" >&2; fail "apt-get install make"; return 1; }
    say "apt-get install make: $(since "$t0")s"

    # make run, in the foreground of its own (host-side) background job.
    t0=$(now)
    inside sh -c "cd $SRC && exec make run" >"$WORK/make-run.log" 2>&1 &
    RUN=$!
    if ! poll 900 grep -q 'ready: every worker is consuming' "$WORK/make-run.log"; then
        tail -n 30 "$WORK/make-run.log" >&2
        fail "workqd did not log ready within 900 s of make run"
        return 1
    fi
    say "make run: workqd ready $(since "$t0")s after make run started"
    grep -E '^== ' "$WORK/make-run.log" | sed 's/^/    make run: /' >&2
    out=$(ct dpkg-query -W -f='${Status} ${Version}' rabbitmq-server 2>&1)
    [[ $out == "install ok installed "* ]] || fail "rabbitmq-server not installed: $out" || return 1
    [ "$(ct systemctl is-active rabbitmq-server)" = active ] \
        || fail "rabbitmq-server.service is not active" || return 1
    say "rabbitmq-server ${out##* } installed by make run, rabbitmq-server.service active"
    out=$(ct timeout 120 "$SRC/.venv/bin/workq-submit" --wait --timeout 60 "hello..." 2>&1)
    status=$?
    [ $status = 0 ] && [[ $out == *" success "* ]] \
        || fail "workq-submit --wait exited $status: $out" || return 1
    say "workq-submit --wait hello...: $out"
    out=$(ct "$SRC/.venv/bin/workqctl" -c "$SRC/etc/workqd/workqd.yaml" status 2>&1) \
        || fail "workqctl status: $out" || return 1
    say "workqctl status: $(echo "$out" | head -n1)"
    out=$(ct "$SRC/.venv/bin/python" -c 'import urllib.request
print(urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=10).read().decode())' 2>&1 \
        | grep '^workqd_tasks_processed_total{.*success') || true
    [[ $out == *" 1.0" ]] || fail "/metrics does not count the task: $out" || return 1
    say "/metrics: $out"
    pid=$(master_pid) || true
    [ -n "$pid" ] || fail "cannot find workqd's master under make run" || return 1
    kill -TERM "$pid"
    local deadline=$((SECONDS + 60))
    while kill -0 "$RUN" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -0 "$RUN" 2>/dev/null && fail "make run did not end within 60 s of TERM to workqd" && return 1
    wait "$RUN"
    status=$?
    RUN=
    [ $status = 0 ] || { tail -n 20 "$WORK/make-run.log" >&2; fail "make run exited $status after TERM"; return 1; }
    say "TERM to workqd's master (host pid $pid): make run exited 0"

    # make test's set-up, with the broker stopped first: it must start it.
    ct systemctl stop rabbitmq-server || fail "cannot stop the container's broker" || return 1
    t0=$(now)
    inside sh -c "cd $SRC && exec bash tests/run.sh tests/integration/test_tasks.py -x -q -k $FAST_TEST" \
        >"$WORK/run-sh.log" 2>&1
    status=$?
    grep -E '^== |passed|failed|error' "$WORK/run-sh.log" | sed 's/^/    tests\/run.sh: /' >&2
    [ $status = 0 ] || { tail -n 40 "$WORK/run-sh.log" >&2; fail "tests/run.sh exited $status"; return 1; }
    [ "$(grep -c '1 passed' "$WORK/run-sh.log")" = 2 ] \
        || fail "tests/run.sh did not pass the test on both venvs" || return 1
    say "bash tests/run.sh tests/integration/test_tasks.py -k $FAST_TEST: exit 0 in $(since "$t0")s (broker started again, both venvs, 1 passed twice)"
}

# The container's loopback has its own 5672, if anything: the host's broker
# must not answer there before make run installed one.
ct_private_network() {
    ! ct timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' 2>/dev/null
}

if [ "$(id -u)" != 0 ]; then
    echo "tests/system/front-door.sh needs root (debootstrap, systemd-nspawn, mount)" >&2
    exit 2
fi
for tool in systemd-nspawn debootstrap git; do
    command -v "$tool" >/dev/null || { echo "front-door.sh: $tool is missing" >&2; exit 2; }
done
trap cleanup EXIT
trap 'exit 130' INT TERM

suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(bookworm trixie)
result=0
for SUITE in "${suites[@]}"; do
    t_suite=$(now)
    if one_suite; then
        say "PASSED in $(since "$t_suite")s"
    else
        result=1
    fi
    cleanup
done
exit $result
