"""An immutable picture of the daemon, taken by the master for whoever reports on it.

The HTTP endpoints, the metrics and the STATUS line read a ``Snapshot`` and
nothing else: no module reaches into the master's pools or another module's
private state, and every answer is consistent within itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

# Master phases, with their allowed transitions (checked by Master.enter).
STARTING, READY, RELOADING, STOPPING = "starting", "ready", "reloading", "stopping"
PHASES = {STARTING: {READY, STOPPING}, READY: {RELOADING, STOPPING},
          RELOADING: {READY, STOPPING}, STOPPING: set()}

# Worker states as exported (label `state` of workqd_workers).
W_STARTING, W_IDLE, W_BUSY, W_DRAINING = "starting", "idle", "busy", "draining"
W_PAUSED = "paused"   # connected, idle, its queue paused (workqctl pause/quiet)
# Queue states as `workqctl status` shows them (QueueView.state).
Q_RUNNING, Q_PAUSED, Q_DRAINING, Q_FAILED = "running", "paused", "draining", "failed"
HEALTHY_LOOP_AGE = 10.0   # seconds: a master loop older than this is stalled


@dataclass(frozen=True)
class WorkerView:
    number: int
    pid: int
    state: str                 # W_STARTING, W_IDLE, W_BUSY, W_PAUSED or W_DRAINING (idle, leaving)
    message_id: str | None
    busy_for: float | None = None   # seconds the running task has run, None when idle
    tasks_done: int = 0             # tasks this worker settled


@dataclass(frozen=True)
class QueueView:
    name: str
    size: int                  # configured workers
    pool_state: str            # running | backoff | fatal
    counters: MappingProxyType  # slot counter word -> value (see slots.COUNTER_WORDS)
    restarts: MappingProxyType  # vocab.RESTART_REASONS -> count
    workers: tuple[WorkerView, ...]
    consuming: int             # workers consuming now, not draining
    depth: tuple[int, int, int] | None   # (ready, consumers, dead letters), None if unknown
    blocked: int = 0           # workers whose publishing the broker blocks (an alarm)
    unserved: str = ""         # why the broker looks as if it does not serve the queue
    paused: bool = False       # workqctl pause/quiet: consumers cancelled, workers stay
    configured: int = 0        # the config's workers (size differs after workqctl scale)
    state: str = Q_RUNNING     # Q_RUNNING, Q_PAUSED, Q_DRAINING or Q_FAILED
    min_workers: int = 0       # autoscale bounds; both equal the configured size otherwise
    max_workers: int = 0


@dataclass(frozen=True)
class Snapshot:
    phase: str
    queues: tuple[QueueView, ...]
    broker_connected: bool
    loop_age: float            # seconds since the master loop last turned
    version: str
    delayed: int | None = None  # messages in the vhost's delay levels, as last polled

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: (ready, one-line reason)."""
        if self.phase == STOPPING:
            return False, "draining: workqd is stopping"
        paused = [q.name for q in self.queues if q.paused]
        if paused:
            return False, "; ".join(f"queue {n}: paused" for n in paused) + " (workqctl resume)"
        for q in self.queues:
            if q.consuming == 0:
                return False, f"queue {q.name}: no worker is consuming"
        if not self.broker_connected:
            return False, "broker not reachable from the master"
        for q in self.queues:
            if q.unserved:
                return False, (f"queue {q.name}: the broker does not serve it ({q.unserved}): "
                               f"a quorum queue that lost its quorum, or its node is down")
            if q.blocked:
                return False, (f"queue {q.name}: the broker blocks publishing (memory or disk "
                               f"alarm); retries wait")
        return True, "ready"

    def healthy(self) -> bool:
        return self.loop_age < HEALTHY_LOOP_AGE and all(q.pool_state != "fatal"
                                                        for q in self.queues)


def frozen(mapping: dict) -> MappingProxyType:
    return MappingProxyType(dict(mapping))
