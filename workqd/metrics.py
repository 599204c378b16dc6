"""Prometheus exposition; the only module that imports prometheus_client.

Nothing is counted here: a custom collector reads, at scrape time, the master's
state (pools, restart counts, poller) and the workers' shared-memory slots. So
the hot path pays nothing for metrics, a dead worker's series vanish with it,
and its counters live on in the master's totals (see slots.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.utils import floatToGoString
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for httpd)
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from . import __version__
from .pool import RESTART_REASONS
from .slots import (BUCKET_WORDS, BUCKETS, BUSY, CONNECTING, IDLE, OUTCOMES, OUTCOME_WORDS,
                    STARTING, W_DURATION_SUM, W_REDELIVERED)

if TYPE_CHECKING:
    from .master import Master


class _Collector:
    def __init__(self, master: "Master"):
        self.master = master

    def collect(self):
        m = self.master
        processed = CounterMetricFamily(
            "workqd_tasks_processed", "Tasks settled, by outcome (success, retry, dead_letter, "
            "timeout).", labels=["queue", "outcome"])
        redelivered = CounterMetricFamily(
            "workqd_tasks_redelivered", "Deliveries that arrived with redelivered=true: the task "
            "may have run before (worker killed, connection lost).", labels=["queue"])
        in_flight = GaugeMetricFamily(
            "workqd_tasks_in_flight", "Tasks being run by a handler now.", labels=["queue"])
        duration = HistogramMetricFamily(
            "workqd_task_duration_seconds", "Time the handler ran, per settled task.",
            labels=["queue"])
        restarts = CounterMetricFamily(
            "workqd_worker_restarts", "Workers replaced, by reason (crash, recycle, timeout, "
            "reload).", labels=["queue", "reason"])
        workers = GaugeMetricFamily(
            "workqd_workers", "Worker processes by state (starting, idle, busy).",
            labels=["queue", "state"])
        ready = GaugeMetricFamily(
            "workqd_queue_messages_ready", "Messages ready in the queue, as last polled by the "
            "master.", labels=["queue"])
        consumers = GaugeMetricFamily(
            "workqd_queue_consumers", "Consumers of the queue on the broker (all hosts), as last "
            "polled.", labels=["queue"])
        with m.lock:
            for name, pool in _pools_by_queue(m):
                c = pool.counters()
                for outcome, w in zip(OUTCOMES, OUTCOME_WORDS):
                    processed.add_metric([name, outcome], c[w])
                redelivered.add_metric([name], c[W_REDELIVERED])
                cumulative, acc = [], 0
                for le, w in zip([*map(floatToGoString, BUCKETS), "+Inf"], BUCKET_WORDS):
                    acc += c[w]
                    cumulative.append((le, acc))
                duration.add_metric([name], cumulative, c[W_DURATION_SUM])
                for reason in RESTART_REASONS:
                    restarts.add_metric([name, reason], pool.restarts[reason])
                states = {"starting": 0, "idle": 0, "busy": 0}
                for proc in pool.procs.values():
                    st = proc.slot.state
                    if st == BUSY:
                        states["busy"] += 1
                    elif st == IDLE and not proc.slot.draining:
                        states["idle"] += 1  # an idle draining worker is leaving: not capacity
                    elif st in (STARTING, CONNECTING):
                        states["starting"] += 1
                in_flight.add_metric([name], states["busy"])
                for state, n in states.items():
                    workers.add_metric([name, state], n)
                if name in m.poller.depth:
                    r, n = m.poller.depth[name]
                    ready.add_metric([name], r)
                    consumers.add_metric([name], n)
        broker = GaugeMetricFamily("workqd_broker_connected",
                                   "1 when the master reached the broker at its last poll.")
        broker.add_metric([], 1 if m.poller.connected else 0)
        build = GaugeMetricFamily("workqd_build_info", "workqd version, always 1.",
                                  labels=["version"])
        build.add_metric([__version__], 1)
        yield from (processed, redelivered, in_flight, duration, restarts, workers, ready,
                    consumers, broker, build)


def _pools_by_queue(m: "Master"):
    """One entry per queue; a pool still draining after its queue was removed and re-added
    by a reload is merged into the new pool of the same name."""
    merged: dict[str, _Merged] = {}
    for pool in [*m.pools.values(), *m._orphans]:
        merged.setdefault(pool.name, _Merged(pool)).add(pool)
    return merged.items()


class _Merged:
    def __init__(self, first):
        self.pools = []
        self.restarts = first.restarts  # shared by pools of one queue (same pool id)
        self.procs = {}
        self._counters = None

    def add(self, pool) -> None:
        # Pools of the same queue share one pool id, so their folded totals are
        # one entry: count them once, then add every live worker.
        if not self.pools:
            self._counters = pool.counters()
        else:
            for proc in pool.procs.values():
                for w, v in proc.slot.counters().items():
                    self._counters[w] += v
        self.pools.append(pool)
        self.procs.update(pool.procs)

    def counters(self):
        return self._counters


class Exposition:
    def __init__(self, master: "Master"):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(master))

    def render(self) -> bytes:
        return generate_latest(self.registry)
