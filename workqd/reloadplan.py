"""A reload as a plan: what the new config means for the running pools, decided
without touching them, so every case is unit-tested without a process.

The master loads the file, asks ``plan_reload`` and applies the steps
(Master.apply_plan); this module reads nothing and changes nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from .config import Config, Queue

# Step kinds.
REMOVE = "remove"   # queue gone from the file: its workers finish their tasks and leave
ADD = "add"         # a new queue: a new pool
READD = "readd"     # removed earlier, its workers still draining, and back: a new pool beside
UPDATE = "update"   # kept: its workers are replaced by ones with the new settings


@dataclass(frozen=True)
class PoolView:
    """What the plan needs to know of a running pool."""
    name: str
    size: int          # workers it keeps now (workqctl scale changes it)
    removed: bool      # removed by an earlier reload, workers still draining


@dataclass(frozen=True)
class Step:
    kind: str
    name: str
    queue: Queue | None = None   # the new config's queue (None for REMOVE)
    was: int = 0                 # UPDATE: the size before the reload


@dataclass(frozen=True)
class Plan:
    config: Config               # the new config, with what only a restart changes kept
    steps: tuple[Step, ...]
    kept_metrics: bool           # metrics.* differed: the running ones stay
    kept_control_socket: bool    # control.socket differed: the running one stays


def plan_reload(old: Config, new: Config, pools: Mapping[str, PoolView]) -> Plan:
    kept_metrics = (new.metrics_listen, new.metrics_tls, new.metrics_basic_auth) != (
        old.metrics_listen, old.metrics_tls, old.metrics_basic_auth)
    if kept_metrics:
        # The listening socket is bound once; the new workers do get new broker settings.
        new = dataclasses.replace(new, metrics_listen=old.metrics_listen,
                                  metrics_tls=old.metrics_tls,
                                  metrics_basic_auth=old.metrics_basic_auth)
    kept_control = new.control_socket != old.control_socket
    if kept_control:
        new = dataclasses.replace(new, control_socket=old.control_socket)
    names = {q.name for q in new.queues}
    steps = [Step(REMOVE, name) for name, pool in pools.items()
             if name not in names and not pool.removed]
    for queue in new.queues:
        pool = pools.get(queue.name)
        if pool is None:
            steps.append(Step(ADD, queue.name, queue))
        elif pool.removed:
            steps.append(Step(READD, queue.name, queue))
        else:
            steps.append(Step(UPDATE, queue.name, queue, was=pool.size))
    return Plan(new, tuple(steps), kept_metrics, kept_control)
