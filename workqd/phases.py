"""What the master does with each event in each of its phases: one table.

The master's loop turns whatever happened (a signal, a reaped child, a control
request, a pool that cannot start workers, ...) into an event and asks
``decide`` what it means in the current phase; the answer names a ``do_<action>``
method of the Master. Every pair of phase and event has an entry, so nothing
that can happen is left to an exception: what has no meaning in a phase is
deferred or ignored, with a log line.

Phases move only along state.PHASES (Master.enter).
"""

from __future__ import annotations

from .state import READY, RELOADING, STARTING, STOPPING

# Events.
SIG_STOP = "SIGTERM or SIGINT"
SIG_QUIT = "SIGQUIT"
SIG_HUP = "SIGHUP (reload requested)"
SIG_CHLD = "SIGCHLD"
SIG_OTHER = "any other signal (USR1, real-time, unknown numbers)"
WORKER_EXIT = "a worker was reaped (any status, any signal)"
POLLER_EXIT = "the queue poller was reaped"
STEER = "control: pause, resume, quiet or scale"
STATUS = "control: status"
HTTP = "an HTTP request (/metrics, /healthz, /readyz)"
BROKER_UP = "the poller reaches the broker"
BROKER_DOWN = "the poller lost the broker"
SLOTS_FULL = "a pool found no free worker slot"
FORK_FAILED = "a pool could not fork a worker"
ALL_CONSUMING = "every worker is consuming (or held, when paused)"
RELOAD_OVERDUE = "the new workers are not all consuming after RELOAD_READY_TIMEOUT"
POOL_FATAL = "a pool cannot stay up"

PHASE_ORDER = (STARTING, READY, RELOADING, STOPPING)

TABLE: dict[str, tuple[str, str, str, str]] = {
    # event            starting          ready             reloading         stopping
    SIG_STOP:       ("stop",           "stop",           "stop",           "stop_now"),
    SIG_QUIT:       ("quit",           "quit",           "quit",           "quit"),
    # A reload during start applies at once and restarts the start with the new
    # config: waiting until every worker consumes could wait forever when the
    # old config is what keeps them from consuming (a wrong broker URL), and
    # nothing was promised to systemd yet, so no capacity has to be kept.
    SIG_HUP:        ("reload_at_start", "reload",        "reload",         "ignore_reload"),
    SIG_CHLD:       ("nothing",        "nothing",        "nothing",        "nothing"),
    SIG_OTHER:      ("ignore_signal",  "ignore_signal",  "ignore_signal",  "ignore_signal"),
    # Exits are accounted for in every phase: that is what frees a slot.
    WORKER_EXIT:    ("account_exit",   "account_exit",   "account_exit",   "account_exit"),
    POLLER_EXIT:    ("replace_poller", "replace_poller", "replace_poller", "poller_gone"),
    STEER:          ("steer",          "steer",          "steer",          "refuse_steering"),
    STATUS:         ("serve",          "serve",          "serve",          "serve"),
    HTTP:           ("serve",          "serve",          "serve",          "serve"),
    # The snapshot reads the poller's word; readiness follows it by itself.
    BROKER_UP:      ("note_broker",    "note_broker",    "note_broker",    "note_broker"),
    BROKER_DOWN:    ("note_broker",    "note_broker",    "note_broker",    "note_broker"),
    # Deferred: the next turn tries again, once a leaving worker is reaped.
    SLOTS_FULL:     ("defer_spawn",    "defer_spawn",    "defer_spawn",    "nothing"),
    FORK_FAILED:    ("defer_spawn",    "defer_spawn",    "defer_spawn",    "nothing"),
    ALL_CONSUMING:  ("announce_ready", "nothing",        "reload_done",    "nothing"),
    RELOAD_OVERDUE: ("nothing",        "nothing",        "reload_late",    "nothing"),
    POOL_FATAL:     ("fail",           "fail",           "fail",           "nothing"),
}


def decide(phase: str, event: str) -> str:
    """The action for ``event`` in ``phase``; "nothing" for anything the table lacks."""
    row = TABLE.get(event)
    if row is None or phase not in PHASE_ORDER:
        return "nothing"
    return row[PHASE_ORDER.index(phase)]


def actions() -> set[str]:
    """Every action the table names (the Master has a ``do_<action>`` for each)."""
    return {a for row in TABLE.values() for a in row}
