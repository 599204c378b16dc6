"""Every key of workqd.yaml, declared once: path, type, default, limits, whether a
reload applies it, and one line of documentation.

The declaration drives validation (``converter``: a key of a simple type is read
by ``Reader.settings`` with the converter its type and limits make; the section
readers list only the keys whose shape needs code) and the reference docs
(``docgen`` writes the key reference of workqd.yaml(5) and of the shipped
workqd.yaml from this table). A key's path names list items with ``[]``:
``queues[].retry.attempts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import convert
from ..limits import MAX_BURST, MAX_CONCURRENCY
from .files import readable_file
from .limits import (DEFAULT_JITTER, DEFAULT_URL, MAX_ATTEMPTS, MAX_BACKOFF, MAX_BODY,
                     MAX_DEFERRALS, MAX_MEMORY, MAX_REDELIVERIES, MAX_SECONDS,
                     MAX_TASKS_PER_WORKER, MAX_TOTAL_WORKERS, U16)

RELOAD = "reload"     # a reload (SIGHUP) applies it: new workers get the new value
RESTART = "restart"   # read at start only: a reload keeps the running value and says so

# Types whose converter is built from the key's limits; every other type (a URL,
# a handler, a list of bindings...) is read by its section's own code.
_CONVERTERS: dict[str, Callable[[Key], Callable[[Any], Any]]] = {
    "whole number": lambda k: convert.whole(k.low, k.high),
    "seconds": lambda k: convert.seconds(k.low, k.high),
    "size": lambda k: convert.sizes(k.low, k.high),
    "choice": lambda k: convert.choice(*k.choices),
    "true|false": lambda k: convert.flag,
    "fraction": lambda k: convert.fraction,
    "file": lambda k: readable_file,
    "directory": lambda k: convert.directory,
    "socket path": lambda k: convert.socket_path,
    "HOST:PORT": lambda k: convert.listen_address,
}


@dataclass(frozen=True)
class Key:
    path: str
    type: str
    default: Any      # as the file would write it; None: unset (or required)
    doc: str
    low: Any = None
    high: Any = None
    choices: tuple[str, ...] = ()
    reload: str = RELOAD
    required: bool = False

    @property
    def section(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]

    @property
    def simple(self) -> bool:
        """Read by Reader.settings with the converter of its type."""
        return self.type in _CONVERTERS


def _whole(path: str, default: int, low: int, high: int, doc: str, **kw: Any) -> Key:
    return Key(path, "whole number", default, doc, low, high, **kw)


def _seconds(path: str, default: float | None, low: float, high: float, doc: str,
             **kw: Any) -> Key:
    return Key(path, "seconds", default, doc, low, high, **kw)


def _flag(path: str, default: bool, doc: str, **kw: Any) -> Key:
    return Key(path, "true|false", default, doc, **kw)


def _choice(path: str, default: str, choices: tuple[str, ...], doc: str) -> Key:
    return Key(path, "choice", default, doc, choices=choices)


KEYS: tuple[Key, ...] = (
    Key("broker", "mapping", None, "How workers reach RabbitMQ."),
    Key("broker.url", "URL", DEFAULT_URL,
        "amqp:// or amqps:// (TLS) URL; user, password and vhost %-encoded, options pika's."),
    Key("broker.urls", "list of URLs", None,
        "One URL per cluster node, instead of url: a worker moves on when its node goes away."),
    Key("broker.password_file", "password file", None,
        "File holding the password alone on one line; overrides the URLs' password, "
        "read again at every connect."),
    _whole("broker.heartbeat", 30, 0, U16, "AMQP heartbeat interval in seconds; 0 turns it off."),
    Key("broker.tls", "mapping", None, "Files for amqps:// URLs."),
    Key("broker.tls.ca_file", "file", None,
        "CA bundle (PEM) the broker's certificate must chain to; unset: the system's."),
    Key("broker.tls.cert_file", "file", None,
        "Client certificate (PEM); its key may be in the same file."),
    Key("broker.tls.key_file", "file", None,
        "The client certificate's key (PEM, no passphrase); needs cert_file."),

    Key("metrics", "mapping", None, "The HTTP endpoint: /metrics, /healthz, /readyz.",
        reload=RESTART),
    Key("metrics.listen", "HOST:PORT", "127.0.0.1:9464",
        "Address to serve on (IPv6 as [::1]:9464); not loopback: set tls and basic_auth.",
        reload=RESTART),
    Key("metrics.tls", "mapping", None, "Serve HTTPS: cert_file and key_file, both or neither.",
        reload=RESTART),
    Key("metrics.tls.cert_file", "file", None, "Server certificate (PEM, with its chain).",
        reload=RESTART),
    Key("metrics.tls.key_file", "file", None, "Server key (PEM, no passphrase).",
        reload=RESTART),
    Key("metrics.tls.client_ca_file", "file", None,
        "Clients must present a certificate signed by a CA in this PEM file.", reload=RESTART),
    Key("metrics.basic_auth", "mapping", None,
        "User name to hash line (workqd hash-password); set: every request must log in.",
        reload=RESTART),

    _seconds("shutdown_timeout", 30, 0, MAX_SECONDS,
             "Seconds running tasks get to finish on stop before their workers are killed."),
    Key("control", "mapping", None, "The workqctl control socket.", reload=RESTART),
    Key("control.socket", "socket path", None,
        "Absolute path of the socket; unset: $RUNTIME_DIRECTORY or /run/workqd, see FILES.",
        reload=RESTART),
    Key("log", "mapping", None, "Logging of the master and its workers."),
    _choice("log.level", "info", ("debug", "info", "warning", "error"), "Least severe level logged."),
    _choice("log.format", "text", ("text", "json"),
            "text: a line per event (journald fields under systemd); json: an object per line."),

    Key("queues", "list", None,
        "The queues, each with its own pool of workers (at most 256 workers in all).",
        required=True),
    Key("queues[].name", "queue name", None,
        "1 to 250 bytes of UTF-8, no spaces or control characters, not amq.*; unique.",
        required=True),
    Key("queues[].handler", "mapping", None,
        "What runs a task: exactly one of python and command.", required=True),
    Key("queues[].handler.python", "module:function", None,
        "package.module:function, called as function(body, task)."),
    Key("queues[].handler.command", "argv", None,
        "[/absolute/program, arg, ...], run without a shell, the body on standard input."),
    Key("queues[].handler.environment", "mapping", None,
        "Variables set for the handler: strings or numbers; WORKQ_* names are workqd's."),
    Key("queues[].handler.working_directory", "directory", None,
        "Absolute path: the command's, or the Python handler's worker's, working directory."),
    Key("queues[].handler.virtualenv", "directory", None,
        "Python handlers: a venv built for workqd's Python, its site-packages added."),
    Key("queues[].handler.python_path", "list of directories", None,
        "Python handlers: absolute directories put in front of sys.path."),
    _choice("queues[].type", "quorum", ("quorum", "classic"),
            "Queue type workqd declares it with (and its side queues)."),
    Key("queues[].workers", "whole number or mapping", 4,
        "Worker processes; or {min, max, idle_after} for a pool that scales between them.",
        low=1, high=MAX_TOTAL_WORKERS),
    _whole("queues[].workers.min", None, 1, MAX_TOTAL_WORKERS,
           "Fewest workers of an autoscaled pool.", required=True),
    _whole("queues[].workers.max", None, 1, MAX_TOTAL_WORKERS,
           "Most workers of an autoscaled pool; counts toward the 256 in all.", required=True),
    _seconds("queues[].workers.idle_after", 30, 1, 86400,
             "Seconds a worker stays idle, nothing waiting, before the pool shrinks by one."),
    _whole("queues[].prefetch", 1, 0, U16,
           "Unacknowledged deliveries a worker may hold; 0: no limit."),
    _seconds("queues[].timeout", 600, 0.1, MAX_SECONDS,
             "Seconds a task may run; past it the try fails with outcome timeout."),
    _seconds("queues[].timeout_grace", 5, 0, 3600.0,
             "Seconds a timed-out command has between SIGTERM and SIGKILL."),
    Key("queues[].retry", "mapping", None, "Tries of a failing task, and the waits between them."),
    _whole("queues[].retry.attempts", 3, 1, MAX_ATTEMPTS,
           "Tries in all before a failing task is dead-lettered; 1: no retry."),
    _whole("queues[].retry.max_deferrals", 10, 0, MAX_DEFERRALS,
           "Deferrals (RetryLater, exit 75) one task may have before one counts as failed."),
    Key("queues[].retry.backoff", "seconds or mapping", [5, 30],
        "Seconds before try 2, 3, ... (the last repeats); or {initial, max, jitter}."),
    _seconds("queues[].retry.backoff.initial", None, 0.001, MAX_BACKOFF,
             "Seconds before try 2, doubling for each later try.", required=True),
    _seconds("queues[].retry.backoff.max", MAX_BACKOFF, 0.001, MAX_BACKOFF,
             "Longest delay; at least initial."),
    Key("queues[].retry.backoff.jitter", "fraction", DEFAULT_JITTER,
        "Part of each delay that is random (0 to 1), so failed tasks come back spread out.",
        low=0, high=1),
    _whole("queues[].max_redeliveries", 3, 1, MAX_REDELIVERIES,
           "Deliveries that may kill their worker before the message is dead-lettered as poison."),
    _whole("queues[].max_tasks_per_worker", 0, 0, MAX_TASKS_PER_WORKER,
           "Replace a worker after this many tasks; 0: never."),
    Key("queues[].max_memory_per_worker", "size", 0,
        "Replace a worker after a task when its resident memory passes this; 0: never.",
        low=0, high=MAX_MEMORY),
    Key("queues[].max_body", "size", "16MiB",
        "Larger messages are dead-lettered (too-large) without running the handler.",
        low=1, high=MAX_BODY),
    _seconds("queues[].import_timeout", 120, 1, 86400.0,
             "Seconds a worker may spend importing its Python handler before it counts as hung."),
    _flag("queues[].allow_reply_queues", False,
          "false: outcomes go to direct reply-to only; true: also to a publisher's named "
          "reply_to queue (a trust decision)."),
    _flag("queues[].declare", True,
          "false: someone else's queue, consumed as it is, only checked to exist."),
    _flag("queues[].declare_side_queues", True,
          "false: no .dead and .delay queues, so no retries (declare: false or type: classic)."),
    Key("queues[].limits", "mapping", None,
        "Cluster-wide limits, shared by every daemon with the same setting (docs/limits.md)."),
    _whole("queues[].limits.concurrency", 0, 0, MAX_CONCURRENCY,
           "Tasks of this queue running at once across all daemons; 0: no cap."),
    Key("queues[].limits.rate", "rate", None,
        'Task starts across all daemons ("50/s", "300/min", "10/h"), kept 2.4 % under it; '
        "unset: no limit."),
    _whole("queues[].limits.burst", 1, 1, MAX_BURST,
           "Starts the rate may save up while the queue is idle, taken at once later."),
    Key("queues[].arguments", "mapping", None,
        "Extra x-arguments for the declaration; the ones workqd sets itself are refused."),
    Key("queues[].bindings", "list", None,
        "Exchanges to bind the queue to; each must exist (workqd never declares one)."),
    Key("queues[].bindings[].exchange", "exchange name", None,
        "An existing exchange, not the default one.", required=True),
    Key("queues[].bindings[].routing_key", "string", "", "Binding key (at most 255 bytes)."),

    Key("schedules", "list", None,
        "Periodic tasks: each fires once per slot however many hosts run it (one leads)."),
    Key("schedules[].name", "schedule name", None,
        "1 to 100 of A-Z a-z 0-9 . _ -; unique; names its broker queues and message ids.",
        required=True),
    Key("schedules[].cron", "cron expression", None,
        "Five fields (minute hour day-of-month month day-of-week) or @daily etc.; or every."),
    Key("schedules[].every", "duration", None,
        "Fire every 90s, 15m, 2h, 1d (whole seconds, at multiples since the epoch); or cron."),
    Key("schedules[].timezone", "time zone", "UTC",
        "zoneinfo name (Europe/Berlin) the cron expression is read in."),
    Key("schedules[].queue", "queue name", None,
        "Queue the task is published to (need not be one of this file's queues).",
        required=True),
    Key("schedules[].body", "string", "", "The task's body."),
    Key("schedules[].headers", "mapping", None, "Headers of the task: strings or numbers."),
    _choice("schedules[].catch_up", "none", ("none", "last"),
            "After more than a minute without a leader: none skips the missed slots, "
            "last fires the newest one."),
)

BY_PATH: dict[str, Key] = {k.path: k for k in KEYS}


def children(section: str) -> list[Key]:
    """The keys directly inside ``section`` ("" for the top level), in declaration order."""
    return [k for k in KEYS if k.section == section]


def names(section: str) -> set[str]:
    """The key names a mapping at ``section`` may hold."""
    return {k.name for k in children(section)}


def converter(path: str) -> Callable[[Any], Any]:
    """The converter of a simple key, made from its type and limits."""
    return _BUILT[path]


_BUILT = {k.path: _CONVERTERS[k.type](k) for k in KEYS if k.simple}
