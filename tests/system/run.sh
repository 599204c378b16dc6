#!/bin/bash
# The system test: the Debian package under a real systemd,
# on Debian 12 bookworm (systemd 252) and Debian 13 trixie (systemd 257).
#
#   tests/system/run.sh [--suite bookworm|trixie]... [--debs DIR]
#
# Builds the .deb from the tree (and an older build of it for the upgrade),
# once for every release, then for each suite boots an overlay of a cached
# Debian root with systemd-nspawn, installs the package there and checks what
# an operator relies on: start waits for READY, tasks are processed, reload
# waits for the new workers, a bad config is refused, watchdog, graceful
# stop, kill -9 recovery, purge and upgrade.
#
# bookworm shares the host's network: the daemon inside uses the host's
# RabbitMQ 3.10 on 127.0.0.1:5672, and tasks and /metrics are driven from here.
# trixie has a private network (--private-network) and its own RabbitMQ 4.0.5,
# so it cannot clash with the host's broker on 5672: everything there is driven
# from inside with nsenter, and trixie's lintian checks the same .deb.
#
# --suite picks releases (default both, in that order). --debs DIR uses the
# .debs in DIR, building them there first when it has none, so several runs
# share one build. WORKQ_SYSTEST_EXTEND=1 adds the long check that a drain
# beyond TimeoutStopSec is extended (EXTEND_TIMEOUT_USEC), about a minute per
# suite. WORKQ_SUBMIT overrides the workq-submit command used on the host.
#
# Prints one PASS/FAIL line per check and then "N passed, M failed"; exits 1
# when a check failed. Needs root.
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
# systemd-analyze security of both units on 884a362; the units must not get worse.
MAX_EXPOSURE=1.1
SUITES=()
DEBS_DIR=
SUITE=
NET=

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
        ct journalctl --no-pager -o short-precise >"$LOGS/journal-$SUITE.txt" 2>/dev/null
        echo "container journal kept in $LOGS/journal-$SUITE.txt" >&2
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

# Where the broker and /metrics are reached: here for a container on the
# host's network, inside it (with its workq-submit and python3) for a private one.
submit() {
    if [ "$NET" = private ]; then
        ct workq-submit --url "$BROKER" -q tasks "$@"
    else
        "${SUBMIT[@]}" --url "$BROKER" -q tasks "$@"
    fi
}
probe() {
    if [ "$NET" = private ]; then
        ct python3 /systest/probe.py "$@"
    else
        "$PY" "$here/probe.py" "$@"
    fi
}
metric() { probe metric "$@"; }
http_status() { probe http "$@"; }

# --- in the container ------------------------------------------------------

prop() { unit_prop workqd "$1"; }
is_active() { [ "$(prop ActiveState)" = active ]; }
main_pid() { prop MainPID; }
# A journal position, and the unit's lines after it.
journal_mark() { ct journalctl -n 1 --show-cursor -o cat --no-pager | sed -n 's/^-- cursor: //p'; }
journal_after() { ct journalctl -u "${2:-workqd}" --no-pager -o cat --after-cursor "$1"; }
# unit_start start|restart UNIT: systemctl's verb, taken once more only when PID 1
# itself failed to spawn the unit's process ("Failed to spawn executor", seen once
# in systemd 257 inside a container, on a start one second after a clean stop;
# result 'resources'). Nothing of workqd ran then; any other failure
# is returned as it is. Each retry is said on stderr, so a run shows how often.
unit_start() {
    local verb=$1 unit=$2 mark
    mark=$(journal_mark)
    ct systemctl "$verb" "$unit" && return 0
    journal_after "$mark" "$unit" | grep -q 'Failed to spawn executor' || return 1
    echo "  systemd could not spawn $unit's executor (PID 1, before workqd ran): $verb once more" >&2
    ct systemctl reset-failed "$unit"
    ct systemctl "$verb" "$unit"
}
# A metric reaches a value; "none" while /metrics does not answer.
metric_is() { local want=$1; shift; [ "$(metric "$@")" = "$want" ]; }
metric_at_least() { local want=$1 got; shift; got=$(metric "$@") && [ "$got" -ge "$want" ]; }
restarted_from() { local pid; pid=$(main_pid); [ "$pid" != "$1" ] && [ "$pid" != 0 ] && is_active; }
# watch_restart OLD-PID SECONDS: wait for restarted_from OLD-PID, recording in WATCHED
# each state the unit passed through (with the seconds since the call) and, if it sat
# in one state past 5s, the processes left in its cgroup then.
watch_restart() {
    local old=$1 deadline=$((SECONDS + $2)) t0 state last= lingered=
    t0=$(now)
    WATCHED=
    while :; do
        state=$(ct systemctl show -P ActiveState,SubState workqd 2>/dev/null | paste -sd/)
        if [ "$state" != "$last" ]; then
            WATCHED+="${WATCHED:+, }$state at $(since "$t0")s"
            last=$state
            local entered=$SECONDS
        fi
        restarted_from "$old" && return 0
        if [ -z "$lingered" ] && [ $((SECONDS - entered)) -ge 5 ]; then
            lingered=$(ct sh -c 'for p in $(cat /sys/fs/cgroup/system.slice/workqd.service/cgroup.procs 2>/dev/null); do
                    printf "%s " "$p:$(cat /proc/$p/comm):$(sed -n "s/^State:\t//p" /proc/$p/status | cut -c1):$(cat /proc/$p/wchan)"; done')
            WATCHED+=" [cgroup then: ${lingered:-empty}]"
        fi
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}
set_workers() { ct sed -i -E "s/^( +workers:) .*/\\1 $1/" "$CONF"; }
set_handler() { ct sed -i -E "s/^( +python:) .*/\\1 $1/" "$CONF"; }
set_shutdown_timeout() { ct sed -i -E "s/^(shutdown_timeout:) [0-9]+/\\1 $1/" "$CONF"; }
workers_total() { metric workqd_workers; }

# --- the checks ------------------------------------------------------------

check_build() {
    local cur prev
    cur=$(bash "$top/packaging/build-deb.sh" --outdir "$DEBS_DIR" 2>"$LOGS/build.log") \
        || { DETAIL="packaging/build-deb.sh failed: $(tail -n 3 "$LOGS/build.log" | tr '\n' ' ')"; return 1; }
    prev=$(bash "$top/packaging/build-deb.sh" --outdir "$DEBS_DIR/prev" \
               --version "$PREVIOUS_VERSION" 2>>"$LOGS/build.log") \
        || { DETAIL="build as $PREVIOUS_VERSION failed"; return 1; }
    find_debs
    DETAIL="$DEB, and $PREV_DEB for the upgrade; one .deb for every release"
}

find_debs() {  # the builds in DEBS_DIR, if both are there
    local cur prev
    cur=$(ls "$DEBS_DIR"/workqd_*_all.deb 2>/dev/null | head -n1)
    prev=$(ls "$DEBS_DIR"/prev/workqd_*_all.deb 2>/dev/null | head -n1)
    [ -n "$cur" ] && [ -n "$prev" ] || return 1
    DEB=$(basename "$cur")
    PREV_DEB=prev/$(basename "$prev")
    CUR_VERSION=$(dpkg-deb -f "$cur" Version)
}

check_lintian() {
    local out
    out=$(lintian --fail-on error,warning --display-info "$DEBS_DIR/$DEB" 2>&1)
    local rc=$?
    out=$(echo "$out" | grep -v -e 'running with root privileges' -e '^N:' | tr '\n' ' ')
    [ $rc -eq 0 ] || { DETAIL="lintian $(lintian --print-version): $out"; return 1; }
    DETAIL="lintian $(lintian --print-version) (the host's): no errors or warnings${out:+; $out}"
}

# Trixie's lintian, inside the trixie container, on the same .deb.
check_lintian_inside() {
    local out rc version
    version=$(ct lintian --print-version)
    out=$(ct lintian --fail-on error,warning --display-info "/debs/$DEB" 2>&1 </dev/null)
    rc=$?
    out=$(echo "$out" | grep -v -e 'running with root privileges' -e '^N:' | tr '\n' ' ')
    [ $rc -eq 0 ] || { DETAIL="lintian $version: $out"; return 1; }
    DETAIL="lintian $version ($SUITE's): no errors or warnings${out:+; $out}"
}

check_boot() {
    local lower t0 net=()
    t0=$(now)
    lower=$(bash "$here/rootfs.sh" "$SUITE") || { DETAIL="debootstrap of the cached root failed"; return 1; }
    local took_root
    took_root=$(since "$t0")
    mkdir -p "$WORK/$SUITE"
    ct_make_root "$lower" "$WORK/$SUITE" || { DETAIL="cannot prepare the root"; return 1; }
    mkdir -p "$CT_ROOT/debs/prev" "$CT_ROOT/systest"
    cp "$DEBS_DIR/$DEB" "$CT_ROOT/debs/"
    cp "$DEBS_DIR/$PREV_DEB" "$CT_ROOT/debs/prev/"
    cp "$here/probe.py" "$CT_ROOT/systest/"
    [ "$NET" = private ] && net=(--private-network)
    t0=$(now)
    ct_boot "workqd-systest-$SUITE" "$LOGS/nspawn-$SUITE.log" "${net[@]}" \
        || { DETAIL="container did not boot: $(tail -n 3 "$LOGS/nspawn-$SUITE.log" | tr '\n' ' ')"; return 1; }
    DETAIL="booted in $(since "$t0")s (root ready in ${took_root}s); $(ct systemctl --version | head -n 1 | cut -d' ' -f1-3), $(ct python3 --version), $NET network; cached root ${lower%/root}, $([ -n "${CT_OVERLAY:-}" ] && echo overlay || echo copy) per run"
}

# The container's own RabbitMQ (trixie: 4.0), started by its package at boot.
check_broker() {
    local t0 version out
    t0=$(now)
    out=$(ct rabbitmqctl await_startup --timeout 120 2>&1 </dev/null) \
        || { DETAIL="rabbitmqctl await_startup: $out"; return 1; }
    version=$(ct rabbitmqctl version 2>/dev/null </dev/null)
    out=$(probe purge tasks 2>&1) || { DETAIL="127.0.0.1:5672 inside does not answer: $out"; return 1; }
    DETAIL="RabbitMQ $version up $(since "$t0")s after the boot finished; $out"
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

# systemd-analyze security of both shipped units, by this release's systemd.
check_security() {
    local unit score scores=() ok=0
    for unit in workqd.service workqd@.service; do
        score=$(ct systemd-analyze security --offline=yes --no-pager "/usr/lib/systemd/system/$unit" 2>/dev/null \
                    | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
        [ -n "$score" ] || { DETAIL="no exposure level for $unit"; return 1; }
        scores+=("$unit $score")
        awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }' || ok=1
    done
    DETAIL="exposure (systemd-analyze security --offline=yes): ${scores[*]}; at most $MAX_EXPOSURE wanted"
    return $ok
}

check_start_ready() {
    ct systemctl stop workqd || { DETAIL="stop failed"; return 1; }
    local t0 took consuming status user
    t0=$(now)
    unit_start start workqd || { DETAIL="systemctl start failed"; return 1; }
    took=$(since "$t0")
    consuming=$(( $(metric workqd_workers state=idle) + $(metric workqd_workers state=busy) ))
    status=$(ct systemctl status workqd --no-pager 2>&1 | grep -m1 'Status:' | sed 's/^ *//')
    user=$(ct ps -o user= -p "$(main_pid)")
    # LimitNOFILE= reaches the master and, through it, every worker.
    local worker limits
    worker=$(ct pgrep -P "$(main_pid)" | head -n1)
    limits="$(nofile "$(main_pid)") / $(nofile "$worker")"
    DETAIL="start returned in ${took}s with $consuming/4 workers consuming; $status; master runs as $user; open files (soft hard) master / worker: $limits"
    [ "$consuming" = 4 ] && [[ $status == *'"4/4 workers'* ]] && [ "$user" = workqd ] \
        && [ "$limits" = "8192 8192 / 8192 8192" ]
}
nofile() { ct awk '/^Max open files/ { print $4, $5 }' "/proc/$1/limits"; }

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
    DETAIL="3 tasks from $([ "$NET" = host ] && echo "the host's" || echo "the container's") workq-submit done in $(since "$t0")s (tasks_processed_total{outcome=\"success\"} +3); /healthz $h, /readyz $r"
    [ "$h" = 200 ] && [ "$r" = 200 ]
}

# Under journald, workqd's lines carry the queue and the message id as journal
# fields (the native protocol), so an operator can select one task's lines.
check_journal_fields() {
    local mid="journal-$$-$RANDOM" d0 out
    d0=$(metric workqd_tasks_processed_total outcome=dead_letter queue=tasks)
    probe malformed tasks "$mid" || { DETAIL="could not publish the malformed task"; return 1; }
    poll 15 metric_is $((d0 + 1)) workqd_tasks_processed_total outcome=dead_letter queue=tasks \
        || { DETAIL="the malformed task was not dead-lettered"; return 1; }
    poll 10 journal_fields "$mid" \
        || { DETAIL="no journal entry with QUEUE=tasks WORKQ_MESSAGE_ID=$mid; the unit's last: $(ct journalctl -u workqd --no-pager -o json -n 1 | cut -c1-1000)"; return 1; }
    out=$(journal_fields "$mid")
    DETAIL="journalctl -u workqd QUEUE=tasks WORKQ_MESSAGE_ID=$mid -o json: $(grep -c . <<<"$out") entry(ies), priority $(grep -o '"PRIORITY":"[0-9]"' <<<"$out" | head -1)"
    grep -q '"MESSAGE":"worker tasks#[0-9]* (pid [0-9]*): task '"$mid"' dead-lettered' <<<"$out" \
        && grep -q '"PRIORITY":"4"' <<<"$out" && grep -q '"SYSLOG_IDENTIFIER":"workqd"' <<<"$out"
}
# The message id is new, so no cursor: journalctl (252) finds nothing for
# --after-cursor together with field matches.
journal_fields() {
    local out
    out=$(ct journalctl -u workqd --no-pager -o json QUEUE=tasks "WORKQ_MESSAGE_ID=$1")
    [ -n "$out" ] && printf '%s\n' "$out"
}

check_template() {
    ct sh -c "sed -e 's/127.0.0.1:9464/127.0.0.1:9465/' -e 's/^\( *workers:\) .*/\1 1/' $CONF \
              >/etc/workqd/second.yaml" || return 1
    unit_start start workqd@second || { DETAIL="systemctl start workqd@second failed"; return 1; }
    local n status dirs kept
    n=$(metric --port 9465 workqd_workers state=idle)
    status=$(unit_prop workqd@second StatusText)
    dirs="$(ct stat -c '%n %a %U:%G' /run/workqd /run/workqd-second 2>&1 | tr '\n' ' ')"
    # workqctl finds each daemon's socket from its config file alone.
    local ctl_main ctl_inst ctl_after
    ctl_main=$(ct workqctl status 2>&1 </dev/null | head -n1)
    ctl_inst=$(ct workqctl -c /etc/workqd/second.yaml status 2>&1 </dev/null | head -n1)
    # Each unit's runtime directory is its own: stopping the main unit
    # leaves the instance's (where its control socket lives) alone.
    ct systemctl stop workqd
    kept=$(ct stat -c '%n' /run/workqd-second 2>/dev/null)
    ctl_after=$(ct workqctl -c /etc/workqd/second.yaml status 2>&1 </dev/null | head -n1)
    local inst_active inst_pid
    inst_active=$(unit_prop workqd@second ActiveState)
    inst_pid=$(unit_prop workqd@second MainPID)
    unit_start start workqd || { DETAIL="restarting workqd failed"; return 1; }
    ct systemctl stop workqd@second
    ct rm -f /etc/workqd/second.yaml
    DETAIL="workqd@second runs /etc/workqd/second.yaml: $n worker on port 9465, status \"$status\"; runtime directories $dirs; workqctl status: \"$ctl_main\"; workqctl -c /etc/workqd/second.yaml status: \"$ctl_inst\"; after stopping workqd: workqd@second $inst_active, ${kept:-/run/workqd-second GONE}, workqctl -c second.yaml: \"$ctl_after\""
    [ "$n" = 1 ] && [[ $status == 1/1\ workers* ]] \
        && [ "$dirs" = "/run/workqd 750 workqd:workqd /run/workqd-second 750 workqd:workqd " ] \
        && [[ $ctl_main == "workqd "*" (pid "*"): "* ]] && [[ $ctl_main != *"(pid $inst_pid)"* ]] \
        && [[ $ctl_inst == "workqd "*" (pid $inst_pid): "* ]] \
        && [[ $ctl_after == "workqd "*" (pid $inst_pid): "* ]] \
        && [ "$kept" = /run/workqd-second ] && [ "$inst_active" = active ]
}

# The control socket under the shipped unit: workqctl reaches it, the socket
# keeps group workqd without a chown (the unit's syscall filter refuses chown),
# and no core dump could write the master's memory (the broker password) out.
check_control() {
    local out mode warned cores
    out=$(ct workqctl status 2>&1 </dev/null | head -n1)
    mode=$(ct stat -c '%a %U:%G' /run/workqd/control.sock 2>&1)
    warned=$(ct journalctl -u 'workqd*' --no-pager -o cat | grep -c 'cannot give')
    cores=$(ct awk '/^Max core file size/ { print $5, $6 }' "/proc/$(main_pid)/limits")
    DETAIL="workqctl status: \"$out\"; /run/workqd/control.sock $mode; \"cannot give ... to group\" lines in the journal since install: $warned; core file size (soft hard): $cores"
    [[ $out == "workqd "*" (pid $(main_pid)): "* ]] && [ "$mode" = "660 workqd:workqd" ] \
        && [ "$warned" = 0 ] && [ "$cores" = "0 0" ]
}

# A handler module whose import takes SLOW_IMPORT seconds: the new workers of a
# reload to it consume that late, long after ExecReload= has finished.
SLOW_IMPORT=4
install_slow_handler() {
    ct sh -c 'cat >/usr/lib/python3/dist-packages/systest_slow.py' <<EOF
"""System test: importing this takes $SLOW_IMPORT s; then it is workqd's sleep_dots."""
import time
time.sleep($SLOW_IMPORT)
from workqd.handlers import sleep_dots  # noqa: E402,F401
EOF
}
# One consistent snapshot of the reload: systemctl show reads all properties at once.
reload_snapshot() { ct systemctl show -p ActiveState -p SubState -p ControlPID workqd | sort | tr '\n' ' '; }

check_reload() {
    local s0 r0 pid0 nr0 t0 took state
    install_slow_handler
    set_workers 2
    set_handler systest_slow:sleep_dots
    s0=$(metric workqd_tasks_processed_total outcome=success queue=tasks)
    r0=$(metric workqd_tasks_redelivered_total queue=tasks)
    pid0=$(main_pid)
    nr0=$(prop NRestarts)
    submit --message-id "across-reload-$$" "five seconds....." 2>>"$LOGS/submit.log" \
        || { DETAIL="workq-submit failed"; return 1; }
    poll 10 metric_is 1 workqd_tasks_in_flight queue=tasks || { DETAIL="the 5-s task never ran"; return 1; }
    t0=$(now)
    ct systemctl reload workqd >"$LOGS/reload.out" 2>&1 &
    local job=$! snap seen= deadline=$((SECONDS + 40))
    # ExecReload= (kill -HUP, then workqd --check) is over in well under
    # SLOW_IMPORT seconds. A unit still "reloading" with no control process
    # left is systemd waiting for the master's READY=1 (252: the queued
    # RELOADING=1 sends it back into reload; 257: reload-notify).
    while kill -0 "$job" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
        snap=$(reload_snapshot)
        [[ $snap == "ActiveState=reloading ControlPID=0 "* ]] && seen=SubState=${snap##*SubState=}
        sleep 0.1
    done
    wait "$job" || { DETAIL="systemctl reload failed: $(cat "$LOGS/reload.out")"; return 1; }
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
    set_handler workqd.handlers:sleep_dots   # for the restarts to come; no reload needed
    local s1 r1
    s1=$(metric workqd_tasks_processed_total outcome=success queue=tasks)
    r1=$(metric workqd_tasks_redelivered_total queue=tasks)
    DETAIL="reload returned in ${took}s, $state, with $idle new workers consuming (their handler import takes ${SLOW_IMPORT}s; $during in all while the old one finished its task); no ExecReload= process left while still reloading: ${seen:-NEVER SEEN}(systemd waiting for READY=1); 2 workers now; the 5-s task ran once (success +$((s1 - s0)), redelivered +$((r1 - r0))); MainPID kept"
    [ -n "$seen" ] && [ "$idle" = 2 ] && [ "$state" = active ] && [ "$s1" = $((s0 + 1)) ] && [ "$r1" = "$r0" ] \
        && [ "$(main_pid)" = "$pid0" ] && [ "$(prop NRestarts)" = "$nr0" ] && is_active
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
    unit_start restart workqd || { DETAIL="restart with WatchdogSec=3s failed"; return 1; }
    local pid1 nr ts t0
    pid1=$(main_pid)
    nr=$(prop NRestarts)
    ts=$(journal_mark)
    t0=$(now)
    ct kill -STOP "$pid1"
    # Under a loaded host, systemd 257 has been seen waiting its whole TimeoutStopSec
    # (45 s) for the killed workers' cgroup to empty before the restart, with the
    # same code that restarts in 4 s on a quiet one: allow for that wait.
    poll 60 restarted_from "$pid1" || { DETAIL="not restarted within 60s of SIGSTOP"; return 1; }
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
    local ts killed=no
    ts=$(journal_mark)
    t0=$(now)
    ct systemctl stop workqd || { DETAIL="systemctl stop failed"; return 1; }
    took=$(since "$t0")
    # Its worker leaves once the task is acked and its reply sent, not at shutdown_timeout.
    journal_grep "$ts" 'killed by SIGKILL' && killed=yes
    result=$(prop Result)
    status=$(prop ExecMainStatus)
    # Acked, not cut: a cut task would be back in the queue, ready.
    depth=$(probe depth tasks)
    # The worker replies to workq-submit --wait before it closes its connection.
    local heard="no outcome"
    if poll 5 bash -c "! kill -0 $bg" && wait "$bg"; then heard="success"; fi
    kill "$bg" 2>/dev/null
    DETAIL="stop took ${took}s waiting for the running 4-s task; a worker killed at shutdown_timeout: $killed; Result=$result, exit status $status; queue tasks: ${depth% *} ready, ${depth#* } consumers; workq-submit --wait: $heard"
    [ "$result" = success ] && [ "$status" = 0 ] && [ "$depth" = "0 0" ] && [ "$heard" = success ] \
        && [ "$killed" = no ] \
        && awk -v t="$took" 'BEGIN { exit !(t > 1) }' && [ "$(prop ActiveState)" = inactive ]
}

# Opt-in (WORKQ_SYSTEST_EXTEND=1), about a minute: with shutdown_timeout: 60,
# a stop that drains a 50-s task outlasts TimeoutStopSec=45s, and the master
# extends it with EXTEND_TIMEOUT_USEC; without that systemd kills the task.
check_extend() {
    local bg t0 took result depth
    set_shutdown_timeout 60
    unit_start start workqd || { DETAIL="start failed"; return 1; }
    submit --message-id "extend-$$" --wait --timeout 90 \
        "fifty seconds$(printf '%.0s.' {1..50})" \
        >"$LOGS/extend-wait.out" 2>&1 &
    bg=$!
    BG_PIDS+=("$bg")
    poll 15 metric_is 1 workqd_tasks_in_flight queue=tasks || { DETAIL="the 50-s task never ran"; return 1; }
    t0=$(now)
    ct systemctl stop workqd
    took=$(since "$t0")
    result=$(prop Result)
    depth=$(probe depth tasks)
    local heard="no outcome"
    if poll 5 bash -c "! kill -0 $bg" && wait "$bg"; then heard="success"; fi
    kill "$bg" 2>/dev/null
    set_shutdown_timeout 30
    probe purge tasks >/dev/null 2>&1   # a cut task must not run into the next check
    DETAIL="shutdown_timeout 60, TimeoutStopSec=$(prop TimeoutStopUSec): stop took ${took}s; Result=$result; queue tasks: ${depth% *} ready; workq-submit --wait: $heard"
    [ "$result" = success ] && [ "$depth" = "0 0" ] && [ "$heard" = success ] \
        && awk -v t="$took" 'BEGIN { exit !(t > 45) }'
}

check_kill9() {
    unit_start start workqd || { DETAIL="start failed"; return 1; }
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
    # systemd restarts the unit once its cgroup is empty: seconds, normally. Its own
    # bound is TimeoutStopSec (45s, for the rest of the cgroup to go) plus RestartSec
    # and a start, so that is this check's deadline. The unit's states on the way
    # are in the line, with what still ran in the cgroup if it lingered.
    watch_restart "$pid1" 60 || { DETAIL="not restarted within 60s of kill -9: $WATCHED"; return 1; }
    took=$(since "$t0")
    local rc=0 deadline=$((SECONDS + 90))
    while kill -0 "$bg" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    wait "$bg" || rc=$?
    local ok
    ok=$(grep -c success "$LOGS/kill9-wait.out")
    DETAIL="kill -9 of the master (pid $pid1) with 2 tasks running: restarted as pid $(main_pid) in ${took}s ($WATCHED); $ok/8 tasks succeeded (workq-submit --wait exit $rc), $(metric workqd_tasks_redelivered_total queue=tasks) redelivered"
    [ "$rc" = 0 ] && [ "$ok" = 8 ] && [ "$(prop NRestarts)" -gt "$nr" ]
}

check_purge() {
    local out left=()
    out=$(ct dpkg --purge workqd 2>&1 </dev/null) || { DETAIL="dpkg --purge failed: $out"; return 1; }
    local f
    for f in /etc/workqd /var/lib/workqd /usr/lib/systemd/system/workqd.service \
             /usr/lib/systemd/system/workqd@.service /lib/systemd/system/workqd.service \
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
    unit_start restart workqd
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

run_suite() {  # run_suite SUITE: boot its container, run every check, power it off
    SUITE=$1
    case $SUITE in
        bookworm) NET=host ;;
        trixie) NET=private ;;
        *) echo "FAIL  unknown suite $SUITE (bookworm or trixie)"; failed=$((failed + 1)); return ;;
    esac
    local t0 f0=$failed
    t0=$(now)
    echo "== $SUITE"
    if [ "$NET" = host ]; then
        if metric workqd_build_info >/dev/null; then
            echo "FAIL  setup: something already serves 127.0.0.1:9464 on the host; stop it first"
            failed=$((failed + 1)); return
        fi
        if ! purged=$(probe purge tasks 2>&1); then
            echo "FAIL  setup: RabbitMQ on 127.0.0.1:5672 does not answer: $purged"
            failed=$((failed + 1)); return
        fi
    fi
    check "boot $SUITE container" check_boot
    if [ -n "${CT_PID:-}" ] && ct_booted; then
        if [ "$NET" = private ]; then
            check "  its own RabbitMQ" check_broker
            check "  lintian in $SUITE" check_lintian_inside
        fi
        check "1 install (dpkg -i)" check_install
        check "  systemd-analyze security" check_security
        check "1 start waits for READY" check_start_ready
        check "2 tasks ($([ "$NET" = host ] && echo from the host || echo inside))" check_tasks
        check "  journal fields QUEUE, WORKQ_MESSAGE_ID" check_journal_fields
        check "  control socket (workqctl)" check_control
        check "  template unit workqd@" check_template
        check "3 reload with 2 workers" check_reload
        check "3 broken config refused" check_reload_refused
        check "4 watchdog restarts" check_watchdog
        check "5 stop waits for task" check_stop
        [ "${WORKQ_SYSTEST_EXTEND:-0}" = 1 ] && check "5 stop extended past 45 s" check_extend
        check "6 kill -9 of the master" check_kill9
        check "7 purge" check_purge
        check "7 upgrade keeps config" check_upgrade
    fi
    if [ "$failed" -gt "$f0" ] && [ -n "${CT_PID:-}" ]; then
        ct journalctl --no-pager -o short-precise >"$LOGS/journal-$SUITE.txt" 2>/dev/null
        echo "container journal kept in $LOGS/journal-$SUITE.txt" >&2
    fi
    ct_shutdown
    echo "$SUITE took $(since "$t0")s" >&2
}

while [ $# -gt 0 ]; do
    case $1 in
        --suite) SUITES+=("$2"); shift 2 ;;
        --debs) DEBS_DIR=$2; shift 2 ;;
        -h|--help) sed -n '2,28s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ ${#SUITES[@]} -gt 0 ] || SUITES=(bookworm trixie)

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
[ -n "$DEBS_DIR" ] || DEBS_DIR=$WORK/debs
mkdir -p "$DEBS_DIR"

if find_debs; then
    echo "using $DEBS_DIR/$DEB and $PREV_DEB"
else
    check "build .deb" check_build
    [ "$failed" -eq 0 ] || finish
    check "lintian" check_lintian
fi
for s in "${SUITES[@]}"; do
    run_suite "$s"
done
echo "system test took $(since "$T_START")s (logs: $LOGS)" >&2
[ "$failed" -gt 0 ] || rm -rf "$LOGS"
finish
