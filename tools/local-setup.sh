#!/usr/bin/env bash
# What `make run` and `make test` need on this machine before they start:
# the Debian packages they name, and a RabbitMQ broker answering on
# 127.0.0.1:5672 (guest/guest, the default config's broker).
#
#   tools/local-setup.sh [DEBIAN-PACKAGE...]
#
# As root it installs what is missing (rabbitmq-server always among them) and
# starts the broker when it is stopped: through systemd where systemd runs,
# else `rabbitmq-server -detached`; then it waits for the broker, at most
# 120 s. A broker that already answers is left exactly as it is: nothing here
# stops, restarts or reconfigures one. Not root, it installs nothing and fails
# with one line when the broker does not answer.
# Exit 0 when the broker answers, 1 otherwise.
set -euo pipefail

PORT=5672
START_TIMEOUT=120

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'local-setup: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# The AMQP listener opens at the end of RabbitMQ's boot, so an open port means
# a broker that takes connections.
broker_answers() { timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT" 2>/dev/null; }

install_packages() {
    local missing=() p
    for p in "$@" rabbitmq-server; do
        installed "$p" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! is_root; then
        log "missing Debian packages (run as root to install): ${missing[*]}"
        return 0
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_broker() {
    if [ -d /run/systemd/system ] && systemctl cat rabbitmq-server.service >/dev/null 2>&1; then
        log "starting rabbitmq-server.service"
        # Type=notify: returns once the broker is up, or fails; bounded either way.
        timeout "$START_TIMEOUT" systemctl start rabbitmq-server.service \
            || die "rabbitmq-server.service did not start (journalctl -u rabbitmq-server)"
    elif ! timeout 30 rabbitmqctl -q status >/dev/null 2>&1; then
        log "RabbitMQ is not running; starting it"
        rabbitmq-server -detached
    fi
    # -detached returns at once, and a node that runs may still be booting:
    # wait for the node, then for the app, then for the listener.
    local deadline=$((SECONDS + START_TIMEOUT))
    until timeout 30 rabbitmqctl -q await_startup >/dev/null 2>&1 && broker_answers; do
        [ $SECONDS -lt $deadline ] \
            || die "RabbitMQ did not answer on 127.0.0.1:$PORT within $START_TIMEOUT s"
        sleep 1
    done
}

install_packages "$@"
broker_answers && exit 0
if ! installed rabbitmq-server; then
    die "no broker answers on 127.0.0.1:$PORT and rabbitmq-server is not installed: run this as root to install and start it, or apt-get install rabbitmq-server"
fi
is_root || die "no broker answers on 127.0.0.1:$PORT: start it (sudo systemctl start rabbitmq-server), or run as root to start it"
start_broker
log "RabbitMQ answers on 127.0.0.1:$PORT"
