#!/bin/bash
# The system test of issue 4: the Debian package under a real systemd 252.
#
# Builds the .deb from the tree (and an older build of it for the upgrade),
# boots an overlay of a cached Debian bookworm root with systemd-nspawn,
# installs the package there and checks what an operator relies on: start
# waits for READY, tasks from the host are processed, reload, watchdog,
# graceful stop, kill -9 recovery, purge and upgrade. The container shares the
# host's network: the daemon inside uses the host's RabbitMQ on 127.0.0.1:5672,
# and its /metrics on 127.0.0.1:9464 is read from here.
#
# Prints one PASS/FAIL line per check and then "N passed, M failed"; exits 1
# when a check failed. Needs root. WORKQ_SUBMIT overrides the workq-submit
# command used to publish from the host.
set -uo pipefail

top=$(cd "$(dirname "$0")/../.." && pwd)
here=$top/tests/system
# shellcheck source=tests/system/lib.sh
. "$here/lib.sh"

PY=/usr/bin/python3          # Debian's, with python3-pika: the probes need it
HOST_PACKAGES=(systemd-container debootstrap lintian python3-pika python3-yaml)
BROKER=amqp://guest:guest@127.0.0.1:5672/%2F
PREVIOUS_VERSION=0.1.0-0~systest1
CONF=/etc/workqd/workqd.yaml

passed=0
failed=0
DETAIL=
BG_PIDS=()
WORK=
LOGS=

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

check() {  # check NAME FUNCTION: run one check, print its line
    local name=$1 t0
    t0=$(now)
    DETAIL=
    if "$2"; then
        passed=$((passed + 1))
        printf 'PASS  %-28s %5ss  %s\n' "$name" "$(since "$t0")" "$DETAIL"
    else
        failed=$((failed + 1))
        printf 'FAIL  %-28s %5ss  %s\n' "$name" "$(since "$t0")" "$DETAIL"
        if [ -n "${CT_PID:-}" ]; then
            ct journalctl -u 'workqd*' --no-pager -n 25 -o short-precise 2>/dev/null \
                | sed 's/^/    journal: /' >&2
        fi
    fi
}

finish() {
    printf '%d passed, %d failed\n' "$passed" "$failed"
    [ "$failed" -eq 0 ]
    exit $?
}

cleanup() {
    local pid
    for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    if [ -n "${CT_PID:-}" ] && [ "$failed" -gt 0 ] && [ -n "$LOGS" ]; then
        ct journalctl --no-pager -o short-precise >"$LOGS/journal.txt" 2>/dev/null
        echo "container journal kept in $LOGS/journal.txt" >&2
    fi
    ct_shutdown
    [ -n "$WORK" ] && rm -rf "$WORK"
}

# --- host side -------------------------------------------------------------

install_host_packages() {
    local missing=() p
    for p in "${HOST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

if [ -n "${WORKQ_SUBMIT:-}" ]; then
    read -r -a SUBMIT <<<"$WORKQ_SUBMIT"
elif command -v workq-submit >/dev/null; then
    SUBMIT=(workq-submit)
else
    SUBMIT=(env PYTHONPATH="$top" "$PY" -m workqd.submit)
fi

submit() { "${SUBMIT[@]}" --url "$BROKER" -q tasks "$@"; }
metric() { "$PY" "$here/probe.py" metric "$@"; }
http_status() { "$PY" "$here/probe.py" http "$@"; }

# --- in the container ------------------------------------------------------

prop() { unit_prop workqd "$1"; }
is_active() { [ "$(prop ActiveState)" = active ]; }
main_pid() { prop MainPID; }
# A journal position, and the unit's lines after it.
journal_mark() { ct journalctl -n 1 --show-cursor -o cat --no-pager | sed -n 's/^-- cursor: //p'; }
journal_after() { ct journalctl -u "${2:-workqd}" --no-pager -o cat --after-cursor "$1"; }
# A metric reaches a value; "none" while /metrics does not answer.
metric_is() { local want=$1; shift; [ "$(metric "$@")" = "$want" ]; }
metric_at_least() { local want=$1 got; shift; got=$(metric "$@") && [ "$got" -ge "$want" ]; }
restarted_from() { local pid; pid=$(main_pid); [ "$pid" != "$1" ] && [ "$pid" != 0 ] && is_active; }
set_workers() { ct sed -i -E "s/^( +workers:) .*/\\1 $1/" "$CONF"; }
workers_total() { metric workqd_workers; }

# --- the checks ------------------------------------------------------------

check_build() {
    local cur prev
    cur=$(bash "$top/packaging/build-deb.sh" --outdir "$WORK/debs" 2>"$LOGS/build.log") \
        || { DETAIL="packaging/build-deb.sh failed: $(tail -n 3 "$LOGS/build.log" | tr '\n' ' ')"; return 1; }
    prev=$(bash "$top/packaging/build-deb.sh" --outdir "$WORK/debs/prev" \
               --version "$PREVIOUS_VERSION" 2>>"$LOGS/build.log") \
        || { DETAIL="build as $PREVIOUS_VERSION failed"; return 1; }
    DEB=$(basename "$cur")
    PREV_DEB=prev/$(basename "$prev")
    CUR_VERSION=$(dpkg-deb -f "$cur" Version)
    DETAIL="$DEB, and prev/$(basename "$prev") for the upgrade"
}

check_lintian() {
    local out
    out=$(lintian --fail-on error,warning --display-info "$WORK/debs/$DEB" 2>&1)
    local rc=$?
    out=$(echo "$out" | grep -v -e 'running with root privileges' -e '^N:' | tr '\n' ' ')
    [ $rc -eq 0 ] || { DETAIL="lintian: $out"; return 1; }
    DETAIL="no errors or warnings${out:+; $out}"
}

check_boot() {
    local lower
    lower=$(bash "$here/rootfs.sh") || { DETAIL="debootstrap of the cached root failed"; return 1; }
    ct_make_root "$lower" "$WORK" || { DETAIL="cannot prepare the root"; return 1; }
    mkdir -p "$CT_ROOT/debs/prev"
    cp "$WORK/debs/$DEB" "$CT_ROOT/debs/"
    cp "$WORK/debs/$PREV_DEB" "$CT_ROOT/debs/prev/"
    ct_boot "workqd-systest" "$LOGS/nspawn.log" \
        || { DETAIL="container did not boot: $(tail -n 3 "$LOGS/nspawn.log" | tr '\n' ' ')"; return 1; }
    DETAIL="$(ct systemctl --version | head -n 1); cached root ${lower%/root}, $([ -n "${CT_OVERLAY:-}" ] && echo overlay || echo copy) per run"
}

check_install() {
    local t0 out
    t0=$(now)
    out=$(ct dpkg -i "/debs/$DEB" 2>&1 </dev/null) || { DETAIL="dpkg -i failed: $out"; return 1; }
    DETAIL="dpkg -i took $(since "$t0")s with Debian's packages only"
    [ "$(ct systemctl is-enabled workqd)" = enabled ] || { DETAIL="$DETAIL; not enabled"; return 1; }
    is_active || { DETAIL="$DETAIL; not started by postinst ($(prop ActiveState))"; return 1; }
    ct getent passwd workqd >/dev/null || { DETAIL="$DETAIL; no workqd user"; return 1; }
    local perms
    perms=$(ct stat -c '%a %U:%G' "$CONF")
    [ "$perms" = "640 root:workqd" ] || { DETAIL="$DETAIL; $CONF is $perms"; return 1; }
    local verify
    verify=$(ct systemd-analyze verify --man=no workqd.service workqd@check.service 2>&1)
    [ -z "$verify" ] || { DETAIL="$DETAIL; systemd-analyze verify: $verify"; return 1; }
    DETAIL="$DETAIL; enabled and started; user workqd; $CONF $perms; systemd-analyze verify clean"
}

check_start_ready() {
    ct systemctl stop workqd || { DETAIL="stop failed"; return 1; }
    local t0 took consuming status user
    t0=$(now)
    ct systemctl start workqd || { DETAIL="systemctl start failed"; return 1; }
    took=$(since "$t0")
    consuming=$(( $(metric workqd_workers state=idle) + $(metric workqd_workers state=busy) ))
    status=$(ct systemctl status workqd --no-pager 2>&1 | grep -m1 'Status:' | sed 's/^ *//')
    user=$(ct ps -o user= -p "$(main_pid)")
    DETAIL="start returned in ${took}s with $consuming/4 workers consuming; $status; master runs as $user"
    [ "$consuming" = 4 ] && [[ $status == *'"4/4 workers'* ]] && [ "$user" = workqd ]
}

check_tasks() {
    local before t0
    before=$(metric workqd_tasks_processed_total outcome=success queue=tasks) \
        || { DETAIL="/metrics does not answer on 127.0.0.1:9464"; return 1; }
    t0=$(now)
    printf 'first.\nsecond.\nthird.\n' | submit --file - 2>"$LOGS/submit.log" \
        || { DETAIL="workq-submit failed: $(cat "$LOGS/submit.log")"; return 1; }
    poll 20 metric_is $((before + 3)) workqd_tasks_processed_total outcome=success queue=tasks \
        || { DETAIL="success counter $(metric workqd_tasks_processed_total outcome=success queue=tasks), wanted $((before + 3))"; return 1; }
    local h r
    h=$(http_status /healthz)
    r=$(http_status /readyz)
    DETAIL="3 tasks from the host's workq-submit done in $(since "$t0")s (tasks_processed_total{outcome=\"success\"} +3); /healthz $h, /readyz $r"
    [ "$h" = 200 ] && [ "$r" = 200 ]
}

check_template() {
    ct sh -c "sed -e 's/127.0.0.1:9464/127.0.0.1:9465/' -e 's/^\( *workers:\) .*/\1 1/' $CONF \
              >/etc/workqd/second.yaml" || return 1
    ct systemctl start workqd@second || { DETAIL="systemctl start workqd@second failed"; return 1; }
    local n status
    n=$(metric --port 9465 workqd_workers state=idle)
    status=$(unit_prop workqd@second StatusText)
    ct systemctl stop workqd@second
    ct rm -f /etc/workqd/second.yaml
    DETAIL="workqd@second runs /etc/workqd/second.yaml: $n worker on port 9465, status \"$status\""
    [ "$n" = 1 ] && [[ $status == 1/1\ workers* ]]
}

check_reload() {
    local s0 r0 pid0 nr0 t0 took state
    set_workers 2
    s0=$(metric workqd_tasks_processed_total outcome=success queue=tasks)
    r0=$(metric workqd_tasks_redelivered_total queue=tasks)
    pid0=$(main_pid)
    nr0=$(prop NRestarts)
    submit --message-id "across-reload-$$" "five seconds....." 2>>"$LOGS/submit.log" \
        || { DETAIL="workq-submit failed"; return 1; }
    poll 10 metric_is 1 workqd_tasks_in_flight queue=tasks || { DETAIL="the 5-s task never ran"; return 1; }
    t0=$(now)
    ct systemctl reload workqd || { DETAIL="systemctl reload failed"; return 1; }
    took=$(since "$t0")
    # The job ends at the master's READY=1: the 2 new workers consume by then,
    # next to the old one that still runs the 5-s task.
    local idle during
    idle=$(metric workqd_workers state=idle)
    state=$(prop ActiveState)
    during=$(workers_total)
    poll 15 metric_is $((s0 + 1)) workqd_tasks_processed_total outcome=success queue=tasks \
        || { DETAIL="the task running across the reload did not complete"; return 1; }
    poll 10 metric_is 2 workqd_workers || { DETAIL="$(workers_total) workers after the reload, wanted 2"; return 1; }
    local s1 r1
    s1=$(metric workqd_tasks_processed_total outcome=success queue=tasks)
    r1=$(metric workqd_tasks_redelivered_total queue=tasks)
    DETAIL="reload returned in ${took}s, $state, with $idle new workers consuming ($during in all while the old one finished its task); 2 workers now; the 5-s task ran once (success +$((s1 - s0)), redelivered +$((r1 - r0))); MainPID kept"
    [ "$idle" = 2 ] && [ "$state" = active ] && [ "$s1" = $((s0 + 1)) ] && [ "$r1" = "$r0" ] && [ "$(main_pid)" = "$pid0" ] \
        && [ "$(prop NRestarts)" = "$nr0" ] && is_active
}

check_reload_refused() {
    local pid0 ts out
    pid0=$(main_pid)
    ts=$(journal_mark)
    ct cp "$CONF" /root/workqd.yaml.good
    set_workers '"four"'
    # Through systemctl: the master refuses the file and ExecReload's --check
    # fails the job.
    if out=$(ct systemctl reload workqd 2>&1); then
        DETAIL="systemctl reload succeeded with a broken config"; return 1
    fi
    is_active && [ "$(main_pid)" = "$pid0" ] || { DETAIL="service not active after a refused reload"; return 1; }
    journal_after "$ts" | grep -q 'queues\[0\].workers: must be a whole number' \
        || { DETAIL="no line naming queues[0].workers in the journal"; return 1; }
    journal_grep "$ts" 'reload refused, keeping the running config' \
        || { DETAIL="the master did not log a refused reload"; return 1; }
    # A bare SIGHUP, as from kill: the master alone refuses and keeps its pools.
    ts=$(journal_mark)
    ct systemctl kill -s HUP --kill-who=main workqd
    poll 10 journal_grep "$ts" 'reload refused, keeping the running config' \
        || { DETAIL="the master did not log a refused reload"; return 1; }
    poll 10 is_active || { DETAIL="not active after the master refused the reload"; return 1; }
    local n
    n=$(workers_total)
    ct cp /root/workqd.yaml.good "$CONF"
    DETAIL="systemctl reload failed (ExecReload's workqd --check) and the master refused the file, as it did a bare SIGHUP; still active, same MainPID, $n workers"
    [ "$(main_pid)" = "$pid0" ] && [ "$n" = 2 ]
}
journal_grep() { journal_after "$1" | grep -q -- "$2"; }

check_watchdog() {
    local dropin=/etc/systemd/system/workqd.service.d
    ct mkdir -p "$dropin"
    ct sh -c "printf '[Service]\nWatchdogSec=3s\n' >$dropin/systest-watchdog.conf"
    ct systemctl daemon-reload
    ct systemctl restart workqd || { DETAIL="restart with WatchdogSec=3s failed"; return 1; }
    local pid1 nr ts t0
    pid1=$(main_pid)
    nr=$(prop NRestarts)
    ts=$(journal_mark)
    t0=$(now)
    ct kill -STOP "$pid1"
    poll 30 restarted_from "$pid1" || { DETAIL="not restarted within 30s of SIGSTOP"; return 1; }
    local took
    took=$(since "$t0")
    ct rm -rf "$dropin"
    ct systemctl daemon-reload
    journal_grep "$ts" 'Watchdog timeout' || { DETAIL="no watchdog timeout in the journal"; return 1; }
    DETAIL="SIGSTOP of the master (pid $pid1): watchdog timeout (WatchdogSec=3s drop-in), restarted as pid $(main_pid) after ${took}s, NRestarts $nr -> $(prop NRestarts)"
    [ "$(prop NRestarts)" -gt "$nr" ]
}

check_stop() {
    local bg t0 took result status depth
    submit --message-id "across-stop-$$" --wait --timeout 20 "four seconds...." \
        >"$LOGS/stop-wait.out" 2>&1 &
    bg=$!
    BG_PIDS+=("$bg")
    poll 10 metric_is 1 workqd_tasks_in_flight queue=tasks || { DETAIL="the 4-s task never ran"; return 1; }
    t0=$(now)
    ct systemctl stop workqd || { DETAIL="systemctl stop failed"; return 1; }
    took=$(since "$t0")
    result=$(prop Result)
    status=$(prop ExecMainStatus)
    # Acked, not cut: a cut task would be back in the queue, ready.
    depth=$("$PY" "$here/probe.py" depth tasks)
    # The worker replies to workq-submit --wait before it closes its connection.
    local heard="no outcome"
    if poll 5 bash -c "! kill -0 $bg" && wait "$bg"; then heard="success"; fi
    kill "$bg" 2>/dev/null
    DETAIL="stop took ${took}s waiting for the running 4-s task; Result=$result, exit status $status; queue tasks: ${depth% *} ready, ${depth#* } consumers; workq-submit --wait: $heard"
    [ "$result" = success ] && [ "$status" = 0 ] && [ "$depth" = "0 0" ] && [ "$heard" = success ] \
        && awk -v t="$took" 'BEGIN { exit !(t > 1) }' && [ "$(prop ActiveState)" = inactive ]
}

check_kill9() {
    ct systemctl start workqd || { DETAIL="start failed"; return 1; }
    local pid1 nr bg t0 took
    pid1=$(main_pid)
    nr=$(prop NRestarts)
    printf 'a..\nb..\nc..\nd..\ne..\nf..\ng..\nh..\n' \
        | submit --file - --wait --timeout 90 >"$LOGS/kill9-wait.out" 2>&1 &
    bg=$!
    BG_PIDS+=("$bg")
    poll 10 metric_is 2 workqd_tasks_in_flight queue=tasks || { DETAIL="tasks never ran"; return 1; }
    t0=$(now)
    ct kill -KILL "$pid1"
    poll 20 restarted_from "$pid1" || { DETAIL="not restarted within 20s of kill -9"; return 1; }
    took=$(since "$t0")
    local rc=0 deadline=$((SECONDS + 90))
    while kill -0 "$bg" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    wait "$bg" || rc=$?
    local ok
    ok=$(grep -c success "$LOGS/kill9-wait.out")
    DETAIL="kill -9 of the master (pid $pid1) with 2 tasks running: restarted as pid $(main_pid) in ${took}s; $ok/8 tasks succeeded (workq-submit --wait exit $rc), $(metric workqd_tasks_redelivered_total queue=tasks) redelivered"
    [ "$rc" = 0 ] && [ "$ok" = 8 ] && [ "$(prop NRestarts)" -gt "$nr" ]
}

check_purge() {
    local out left=()
    out=$(ct dpkg --purge workqd 2>&1 </dev/null) || { DETAIL="dpkg --purge failed: $out"; return 1; }
    local f
    for f in /etc/workqd /var/lib/workqd /lib/systemd/system/workqd.service \
             /etc/systemd/system/multi-user.target.wants/workqd.service /usr/bin/workqd; do
        ct test -e "$f" -o -L "$f" && left+=("$f")
    done
    ct dpkg-statoverride --list "$CONF" >/dev/null && left+=("statoverride")
    ct pgrep -u workqd >/dev/null && left+=("workqd processes")
    [ "$(prop LoadState)" = not-found ] || left+=("unit $(prop LoadState)")
    DETAIL="dpkg --purge: ${left[*]:-no files, unit, statoverride or process left}"
    [ ${#left[@]} -eq 0 ]
}

check_upgrade() {
    local out pid_old
    out=$(ct dpkg -i "/debs/$PREV_DEB" 2>&1 </dev/null) || { DETAIL="installing $PREVIOUS_VERSION failed: $out"; return 1; }
    set_workers 3
    ct sh -c "echo '# local edit by the system test' >>$CONF"
    ct systemctl restart workqd
    pid_old=$(main_pid)
    out=$(ct dpkg -i "/debs/$DEB" 2>&1 </dev/null) || { DETAIL="upgrade failed: $out"; return 1; }
    local version kept perms
    version=$(ct dpkg-query -W -f='${Version}' workqd)
    kept=$(ct grep -c -e '# local edit by the system test' -e '^ *workers: 3$' "$CONF")
    perms=$(ct stat -c '%a %U:%G' "$CONF")
    poll 15 metric_is 3 workqd_workers state=idle || { DETAIL="$(workers_total) workers after the upgrade, wanted the edited 3"; return 1; }
    DETAIL="$PREVIOUS_VERSION -> $version: local edit kept ($kept/2 lines, no prompt, $perms), restarted (pid $pid_old -> $(main_pid)) with the edited 3 workers"
    [ "$version" = "$CUR_VERSION" ] && [ "$kept" = 2 ] && [ "$perms" = "640 root:workqd" ] \
        && ! ct test -e "$CONF.dpkg-new" && ! ct test -e "$CONF.dpkg-dist" \
        && [ "$(main_pid)" != "$pid_old" ] && is_active
}

# --- main ------------------------------------------------------------------

if [ "$(id -u)" != 0 ]; then
    echo "tests/system/run.sh needs root (debootstrap, systemd-nspawn, mount)" >&2
    exit 2
fi
install_host_packages || { echo "cannot install ${HOST_PACKAGES[*]}" >&2; exit 2; }

WORK=$(mktemp -d /var/tmp/workqd-systest.XXXXXX)
LOGS=$(mktemp -d /tmp/workqd-systest-logs.XXXXXX)
trap cleanup EXIT
trap 'exit 130' INT TERM
T_START=$(now)

if metric workqd_build_info >/dev/null; then
    echo "FAIL  setup: something already serves 127.0.0.1:9464 on the host; stop it first"
    failed=1
    finish
fi
if ! purged=$("$PY" "$here/probe.py" purge tasks 2>&1); then
    echo "FAIL  setup: RabbitMQ on 127.0.0.1:5672 does not answer: $purged"
    failed=1
    finish
fi

check "build .deb" check_build
[ "$failed" -eq 0 ] || finish
check "lintian" check_lintian
check "boot bookworm container" check_boot
[ -n "${CT_PID:-}" ] && ct_booted || finish
check "1 install (dpkg -i)" check_install
check "1 start waits for READY" check_start_ready
check "2 tasks from the host" check_tasks
check "  template unit workqd@" check_template
check "3 reload with 2 workers" check_reload
check "3 broken config refused" check_reload_refused
check "4 watchdog restarts" check_watchdog
check "5 stop waits for task" check_stop
check "6 kill -9 of the master" check_kill9
check "7 purge" check_purge
check "7 upgrade keeps config" check_upgrade
echo "system test took $(since "$T_START")s (logs: $LOGS)" >&2
[ "$failed" -gt 0 ] || rm -rf "$LOGS"
finish
