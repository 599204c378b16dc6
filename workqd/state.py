"""An immutable picture of the daemon, taken by the master for whoever reports on it.

The HTTP endpoints, the metrics and the STATUS line read a ``Snapshot`` and
nothing else: no module reaches into the master's pools or another module's
private state, and every answer is consistent within itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from .slots import CONSUMING, HOLDS_SLOT, LEADS_RATE, LIMITED, PAUSED, WAITS_SLOT, WAITS_TOKEN

# Master phases, with their allowed transitions (checked by Master.enter).
STARTING, READY, RELOADING, STOPPING = "starting", "ready", "reloading", "stopping"
PHASES = {STARTING: {READY, STOPPING}, READY: {RELOADING, STOPPING},
          RELOADING: {READY, STOPPING}, STOPPING: set()}

# Worker states as exported (label `state` of workqd_workers).
W_STARTING, W_IDLE, W_BUSY, W_DRAINING = "starting", "idle", "busy", "draining"
W_PAUSED = "paused"   # connected, idle, its queue paused (workqctl pause/quiet)
W_LIMITED = "limited"  # connected, waiting for one of its queue's concurrency slots
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
    limit: int = 0                  # slots.WAITS_SLOT/WAITS_TOKEN/HOLDS_SLOT/LEADS_RATE bits


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
    limits: object = None      # the queue's config.Limits
    limited: int = 0           # workers waiting for a concurrency slot, not consuming

    def count_limit(self, bit: int) -> int:
        """Workers whose limit word has ``bit`` (slots.WAITS_SLOT, HOLDS_SLOT, ...)."""
        return sum(1 for w in self.workers if w.limit & bit)

    @property
    def slots_held(self) -> int:
        return self.count_limit(HOLDS_SLOT)

    @property
    def waiting_slot(self) -> int:
        return self.count_limit(WAITS_SLOT)

    @property
    def waiting_token(self) -> int:
        return self.count_limit(WAITS_TOKEN)

    @property
    def leads_rate(self) -> bool:
        return self.count_limit(LEADS_RATE) > 0


@dataclass(frozen=True)
class ScheduleView:
    """One schedule as this daemon's poller last reported it (schedules.py)."""
    name: str
    queue: str
    leading: bool              # this host fires it now
    leader: str                # who leads, as the record last said ("" unknown)
    last_fired: float | None   # the newest slot fired (by any host), seconds since the epoch
    next: float | None         # the next slot
    fired: int = 0             # firings this host published


@dataclass(frozen=True)
class Snapshot:
    phase: str
    queues: tuple[QueueView, ...]
    broker_connected: bool
    loop_age: float            # seconds since the master loop last turned
    version: str
    delayed: int | None = None  # messages in the vhost's delay levels, as last polled
    cancels: int | None = None  # cancels this host holds (the cancel log), None until read
    schedules: tuple[ScheduleView, ...] = ()

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: (ready, one-line reason)."""
        if self.phase == STOPPING:
            return False, "draining: workqd is stopping"
        paused = [q.name for q in self.queues if q.paused]
        if paused:
            return False, "; ".join(f"queue {n}: paused" for n in paused) + " (workqctl resume)"
        for q in self.queues:
            # Held back by a cluster-wide concurrency cap is working as configured.
            if q.consuming == 0 and q.limited == 0:
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


def worker_view(proc, now: float) -> WorkerView:
    """One worker (a pool.WorkerProc) as reported: busy, draining, idle, paused or starting."""
    slot = proc.slot
    busy_for = None
    # The handler thread writes busy before draining as it begins a recycling
    # worker's last task, so draining is read first: read the other way round, a
    # worker starting that task could be seen not busy yet but already draining,
    # and leave the pool's capacity one short for a scrape.
    draining = slot.draining
    if slot.busy:
        st = W_BUSY
    elif draining:
        st = W_DRAINING
    elif slot.state == CONSUMING:
        st = W_IDLE
    elif slot.state == PAUSED:
        st = W_PAUSED
    elif slot.state == LIMITED:
        st = W_LIMITED
    else:
        st = W_STARTING
    if st == W_BUSY:
        busy_for = max(0.0, now - slot.busy_since)
    return WorkerView(proc.number, proc.pid, st, slot.message_id(), busy_for, slot.tasks_done,
                      slot.limit)


def take_snapshot(phase: str, pools: Iterable, depth: Mapping[str, tuple[int, int, int]],
                  unserved: Callable[[str], str], queue_state: Callable[[object], str],
                  broker_connected: bool, loop_age: float, version: str,
                  now: float, delayed: int | None = None,
                  cancels: int | None = None, schedules: tuple = (),
                  counters: bool = True) -> Snapshot:
    """The picture of ``pools`` (the master's pool.Pool objects, live and draining).
    ``counters=False`` leaves every QueueView.counters empty, for answers that show none
    (`workqctl status`): summing them is a third of the work."""
    views: dict[str, QueueView] = {}
    merged: dict[str, list] = {}
    for pool in pools:
        if not pool.removed or pool.procs:
            merged.setdefault(pool.name, []).append(pool)
    for name, group in merged.items():
        live = [p for p in group if not p.removed]
        # Pools of one queue share a pool id, so the folded totals count once.
        totals: dict = {}
        if counters:
            totals = group[0].counters()
            for extra in group[1:]:
                for proc in extra.procs.values():
                    for w, v in proc.slot.counters().items():
                        totals[w] += v
        workers = tuple(worker_view(proc, now) for p in group for proc in p.procs.values())
        if not live:
            continue   # removed by a reload: its leaving workers are not a queue to report
        views[name] = QueueView(
            name=name, size=live[0].size, pool_state=live[0].state,
            paused=live[0].paused, configured=live[0].queue.workers,
            min_workers=live[0].queue.workers, max_workers=live[0].queue.most_workers,
            limits=live[0].queue.limits, limited=sum(p.limited() for p in live),
            state=queue_state(live[0]),
            counters=frozen(totals), restarts=frozen(group[0].restarts),
            workers=workers, consuming=sum(p.consuming() for p in live),
            depth=depth.get(name),
            blocked=sum(1 for p in group for proc in p.procs.values() if proc.slot.blocked),
            unserved=unserved(name))
    return Snapshot(phase=phase, queues=tuple(views.values()), broker_connected=broker_connected,
                    loop_age=loop_age, version=version, delayed=delayed, cancels=cancels,
                    schedules=tuple(schedules))
