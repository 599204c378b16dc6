# Helpers for tests/system/run.sh: a booted systemd-nspawn container on an
# overlay of the cached root, commands inside it, polling with deadlines.
# shellcheck shell=bash

CT_PATH=/usr/sbin:/usr/bin:/sbin:/bin

# poll SECONDS COMMAND...: run COMMAND every 0.2s until it succeeds; fails at the deadline.
poll() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

# Mount an overlay of the read-only cached root LOWER at WORK/root (a copy when
# overlayfs is not available), so each run starts from the same clean root.
ct_make_root() {  # ct_make_root LOWER WORK
    local lower=$1 work=$2
    mkdir -p "$work/upper" "$work/ovl" "$work/root"
    if mount -t overlay overlay -o "lowerdir=$lower,upperdir=$work/upper,workdir=$work/ovl" \
            "$work/root" 2>/dev/null; then
        CT_OVERLAY=$work/root
    else
        cp -a "$lower/." "$work/root/"
    fi
    CT_ROOT=$work/root
}

# Boot the container in the background; sets CT_NSPAWN (systemd-nspawn's pid)
# and CT_PID (the container's systemd), and waits for the boot to finish
# (is-system-running: every start job done, the broker's too if it has one).
ct_boot() {  # ct_boot NAME LOG [NSPAWN-OPTION...]
    local name=$1 log=$2; shift 2
    setsid systemd-nspawn -D "$CT_ROOT" --boot --machine="$name" --register=no --keep-unit "$@" \
        </dev/null >"$log" 2>&1 &
    CT_NSPAWN=$!
    CT_PID=
    local deadline=$((SECONDS + 30))
    while [ -z "$CT_PID" ]; do
        CT_PID=$(cat "/proc/$CT_NSPAWN/task/$CT_NSPAWN/children" 2>/dev/null | awk '{print $1}')
        [ -n "$CT_PID" ] && [ "$(cat "/proc/$CT_PID/comm" 2>/dev/null)" = systemd ] || CT_PID=
        [ $SECONDS -lt $deadline ] && kill -0 "$CT_NSPAWN" 2>/dev/null || return 1
        [ -n "$CT_PID" ] || sleep 0.1
    done
    poll 120 ct_booted
}

ct_booted() {
    local state
    state=$(ct systemctl is-system-running 2>/dev/null)
    [ "$state" = running ] || [ "$state" = degraded ]
}

# ct COMMAND...: run COMMAND inside the container, with a clean environment.
ct() {
    nsenter -t "$CT_PID" -a env -i PATH="$CT_PATH" LANG=C.UTF-8 SYSTEMD_PAGER=cat \
        SYSTEMD_COLORS=0 "$@"
}

# Power the container off and wait for systemd-nspawn to exit; kill it (by its
# pid) only if it does not. Then unmount the overlay.
ct_shutdown() {
    if [ -n "${CT_NSPAWN:-}" ] && kill -0 "$CT_NSPAWN" 2>/dev/null; then
        [ -n "${CT_PID:-}" ] && ct systemctl poweroff >/dev/null 2>&1
        local deadline=$((SECONDS + 20))
        while kill -0 "$CT_NSPAWN" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if kill -0 "$CT_NSPAWN" 2>/dev/null; then
            kill -TERM "$CT_NSPAWN" 2>/dev/null
            sleep 2
            kill -KILL "$CT_NSPAWN" 2>/dev/null
        fi
        wait "$CT_NSPAWN" 2>/dev/null
    fi
    CT_NSPAWN=
    CT_PID=
    if [ -n "${CT_OVERLAY:-}" ]; then
        umount "$CT_OVERLAY" 2>/dev/null || umount -l "$CT_OVERLAY"
        CT_OVERLAY=
    fi
}

# unit_prop UNIT PROPERTY: one property's value.
unit_prop() {
    ct systemctl show -P "$2" "$1"
}
