"""The configuration as frozen objects: what every other module imports.

Defaults here are the values a key that is absent (or null) gets: the readers
pass only the keys the file gives. ``schema`` declares the same defaults for
the documentation, and tests/test_config_schema.py checks that both agree.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .limits import DEFAULT_URL, JITTER_STEPS


@dataclass(frozen=True)
class TLS:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class Broker:
    urls: tuple[str, ...] = (DEFAULT_URL,)
    password: str | None = None  # read from password_file, overrides the URL's
    password_file: str | None = None  # read again at every connect, so a rotated secret applies
    heartbeat: int = 30
    tls: TLS = field(default_factory=TLS)


@dataclass(frozen=True)
class Handler:
    python: str | None = None            # "package.module:function"
    command: tuple[str, ...] | None = None  # argv, run without a shell
    environment: tuple[tuple[str, str], ...] = ()  # (name, value) set for the handler
    working_directory: str | None = None
    python_path: tuple[str, ...] = ()    # directories put in front of sys.path (Python only)
    virtualenv: str | None = None        # a venv whose site-packages the worker adds (Python only)


@dataclass(frozen=True)
class Retry:
    attempts: int = 3
    backoff: tuple[float, ...] = (5.0, 30.0)   # before try 2, 3, ...; the last repeats
    # A fraction of each delay that is random (``backoff: {initial, max, jitter}``), so
    # tasks failed by one outage come back spread out, not in the same second. The
    # random part takes one of JITTER_STEPS values.
    jitter: float = 0.0
    # Deferrals (RetryLater, exit 75) one task may have before it counts as failed.
    max_deferrals: int = 10

    def delay_before(self, attempt: int, pick: float | None = None) -> float:
        """Seconds to wait before try number ``attempt`` (2, 3, ...); ``pick`` in [0, 1)
        chooses the jitter step (random when None)."""
        if not self.backoff:
            return 0.0
        steps = self._steps(self.backoff[min(attempt - 2, len(self.backoff) - 1)])
        if len(steps) == 1:
            return steps[0]
        return steps[int((random.random() if pick is None else pick) * len(steps))
                     % len(steps)]

    def delays(self) -> list[float]:
        """Every delay a retry (or a deferral) of this queue can wait (each had a delay
        queue of its own in earlier versions): try N waits delay_before(N); a deferral of
        try N waits the delay of try N + 1, so with deferrals on the last try's delay is
        one further."""
        used = self.backoff[:max(0, self.attempts - 1 + (1 if self.max_deferrals else 0))]
        return sorted({d for b in used for d in self._steps(b) if d > 0})

    def _steps(self, base: float) -> tuple[float, ...]:
        if not self.jitter or base == 0:
            return (base,)
        low = base * (1 - self.jitter)
        return tuple(sorted({jitter_step(low + (base - low) * k / (JITTER_STEPS - 1))
                             for k in range(JITTER_STEPS)}))



def jitter_step(seconds: float) -> float:
    """Round a jittered delay to two significant digits (at least 1 ms): a few distinct
    delays per step, with short names among the old delay queues' check_names guards."""
    return max(0.001, float(f"{seconds:.2g}"))


@dataclass(frozen=True)
class Autoscale:
    """``workers: {min: 2, max: 16, idle_after: 30}``: the pool moves between min and max."""
    min: int
    max: int
    idle_after: float = 30.0   # seconds a worker stays idle before the pool shrinks by one


@dataclass(frozen=True)
class Limits:
    """``limits: {concurrency, rate, burst}``: caps shared by every daemon with the same
    setting, kept on the broker (workqd/limits.py, docs/limits.md)."""
    concurrency: int = 0      # tasks of the queue running at once, cluster-wide; 0: no cap
    rate: float = 0.0         # task starts per second, cluster-wide; 0: no rate limit
    rate_text: str = ""       # the rate as written, normalised ("50/s"): names its bucket
    burst: int = 1            # starts the bucket may save up while idle

    @property
    def any(self) -> bool:
        return bool(self.concurrency or self.rate)


@dataclass(frozen=True)
class Binding:
    exchange: str
    routing_key: str = ""


@dataclass(frozen=True)
class Queue:
    name: str
    handler: Handler
    type: str = "quorum"
    workers: int = 4
    prefetch: int = 1
    timeout: float = 600.0
    timeout_grace: float = 5.0   # seconds between SIGTERM and SIGKILL of a timed-out command
    retry: Retry = field(default_factory=Retry)
    max_redeliveries: int = 3
    max_tasks_per_worker: int = 0
    max_memory_per_worker: int = 0  # bytes
    max_body: int = 16 * 1024 * 1024  # bytes
    # Seconds a worker may spend loading its Python handler (imports) before the
    # master calls it hung; the liveness clock only starts once the import is done.
    import_timeout: float = 120.0
    # False: outcomes go only to direct reply-to (amq.rabbitmq.reply-to.*); a named
    # reply queue is a publisher aiming workqd's credentials, so it is a trust decision.
    allow_reply_queues: bool = False
    # Not a key of its own: read from ``workers: {min, max}`` (then ``workers`` is its min).
    autoscale: Autoscale | None = field(default=None, metadata={"key": "workers"})
    declare: bool = True              # False: the queue is someone else's, checked passively
    declare_side_queues: bool = True  # False: no .dead/.delay queues, so no retries
    arguments: tuple[tuple[str, Any], ...] = ()  # extra x-arguments for the declare
    bindings: tuple[Binding, ...] = ()
    limits: Limits = field(default_factory=Limits)

    @property
    def most_workers(self) -> int:
        return self.autoscale.max if self.autoscale else self.workers

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.name}.dead"

    @property
    def idle_consumers_expected(self) -> bool:
        """Consumers of this queue may sit idle while tasks wait: a single active consumer
        queue, or one declared by others (it may be one). Then idle is no sign of a fault."""
        return not self.declare or bool(dict(self.arguments).get("x-single-active-consumer"))


@dataclass(frozen=True)
class Schedule:
    """A periodic task (schedules.py): exactly one of cron and every is set."""
    name: str
    queue: str
    cron: str | None = None
    every: float | None = None      # seconds, whole
    timezone: str = "UTC"
    body: str = ""
    headers: tuple[tuple[str, Any], ...] = ()
    catch_up: str = "none"          # none | last


@dataclass(frozen=True)
class MetricsTLS:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set: clients must present a certificate it signed


@dataclass(frozen=True)
class Config:
    path: str
    broker: Broker
    queues: tuple[Queue, ...]
    metrics_listen: tuple[str, int] = ("127.0.0.1", 9464)
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    log_format: str = "text"    # text | json (logsetup.py)
    warnings: tuple[str, ...] = ()
    metrics_tls: MetricsTLS | None = None
    metrics_basic_auth: tuple[tuple[str, str], ...] = ()  # (user, webauth hash line); () = open
    control_socket: str | None = None   # None: control.server_path() picks it
    schedules: tuple[Schedule, ...] = ()

    def queue(self, name: str) -> Queue:
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(name)
