"""Prometheus exposition; the only module that imports prometheus_client.

Nothing is counted here: a collector turns the master's latest ``Snapshot``
(state.py) into metric families at scrape time. So the hot path pays nothing
for metrics, a dead worker's series vanish with it, and its counters live on
in the master's totals (see slots.py).
"""

from __future__ import annotations

import gzip

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.utils import floatToGoString

from .slots import (BUCKET_WORDS, BUCKETS, OUTCOME_WORDS, W_DURATION_SUM, W_LIMIT_TOKENS,
                    W_LIMIT_WAITED_SLOT, W_LIMIT_WAITED_TOKEN, W_REDELIVERED, W_WAIT_SUM,
                    WAIT_BUCKET_WORDS)
from .state import W_BUSY, W_IDLE, W_LIMITED, W_PAUSED, W_STARTING, Snapshot
from .vocab import OUTCOMES, RESTART_REASONS

_LE = (*map(floatToGoString, BUCKETS), "+Inf")


def families(snap: Snapshot):
    processed = CounterMetricFamily(
        "workqd_tasks_processed", "Tasks settled, by outcome (success, retry, dead_letter, "
        "timeout, deferred, expired, cancelled).", labels=["queue", "outcome"])
    redelivered = CounterMetricFamily(
        "workqd_tasks_redelivered", "Deliveries that arrived with redelivered=true: the task "
        "may have run before (worker killed, connection lost).", labels=["queue"])
    in_flight = GaugeMetricFamily(
        "workqd_tasks_in_flight", "Tasks being run by a handler now.", labels=["queue"])
    duration = HistogramMetricFamily(
        "workqd_task_duration_seconds", "Time the handler ran, per settled task.",
        labels=["queue"])
    wait = HistogramMetricFamily(
        "workqd_task_queue_wait_seconds", "Time from publish to the start of the handler, for "
        "first deliveries of first tries: workq-submit's millisecond stamp, else the "
        "timestamp property (whole seconds).", labels=["queue"])
    restarts = CounterMetricFamily(
        "workqd_worker_restarts", "Workers replaced, by reason (crash, recycle, timeout, "
        "consumer_timeout, cancelled, reload).", labels=["queue", "reason"])
    workers = GaugeMetricFamily(
        "workqd_workers", "Worker processes by state (starting, idle, busy, paused, limited: "
        "waiting for a concurrency slot).",
        labels=["queue", "state"])
    ready = GaugeMetricFamily(
        "workqd_queue_messages_ready", "Messages ready in the queue, as last polled by the "
        "master.", labels=["queue"])
    consumers = GaugeMetricFamily(
        "workqd_queue_consumers", "Consumers of the queue on the broker (all hosts), as last "
        "polled.", labels=["queue"])
    dead = GaugeMetricFamily(
        "workqd_dead_letter_messages", "Messages waiting in the queue's dead-letter queue "
        "<queue>.dead, as last polled.", labels=["queue"])
    blocked = GaugeMetricFamily(
        "workqd_publishing_blocked", "Workers whose publishing connection the broker blocks "
        "(memory or disk alarm): their retries and dead letters wait.", labels=["queue"])
    paused = GaugeMetricFamily(
        "workqd_queue_paused", "1 while the queue is paused (workqctl pause or quiet): its "
        "workers run what they hold and take nothing new.", labels=["queue"])
    size = GaugeMetricFamily(
        "workqd_pool_size", "Workers the pool keeps: the config's, or workqctl scale's until "
        "the next reload.", labels=["queue"])
    least = GaugeMetricFamily(
        "workqd_pool_min_workers", "The pool's configured minimum (its size when not "
        "autoscaled).", labels=["queue"])
    most = GaugeMetricFamily(
        "workqd_pool_max_workers", "The pool's configured maximum (its size when not "
        "autoscaled).", labels=["queue"])
    cap = GaugeMetricFamily(
        "workqd_limit_concurrency",
        "The queue's cluster-wide concurrency cap (limits.concurrency).",
        labels=["queue"])
    held = GaugeMetricFamily(
        "workqd_limit_slots_held", "Concurrency slots of the queue held by this host's workers.",
        labels=["queue"])
    rate = GaugeMetricFamily(
        "workqd_limit_rate", "The queue's cluster-wide rate limit, in task starts per second.",
        labels=["queue"])
    limit_waiting = GaugeMetricFamily(
        "workqd_limit_waiting", "Held back by a cluster-wide limit now: workers waiting for a "
        "concurrency slot (limit=concurrency), tasks waiting for a rate token (limit=rate).",
        labels=["queue", "limit"])
    limit_waited = CounterMetricFamily(
        "workqd_limit_wait_seconds", "Seconds spent waiting for a limit: by workers for a "
        "concurrency slot, by tasks for a rate token.", labels=["queue", "limit"])
    tokens = CounterMetricFamily(
        "workqd_limit_tokens_taken", "Rate tokens this host's workers took (one per task "
        "start).", labels=["queue"])
    for q in snap.queues:
        least.add_metric([q.name], q.min_workers)
        most.add_metric([q.name], q.max_workers)
        blocked.add_metric([q.name], q.blocked)
        paused.add_metric([q.name], 1 if q.paused else 0)
        size.add_metric([q.name], q.size)
        c = q.counters
        for outcome, w in zip(OUTCOMES, OUTCOME_WORDS):
            processed.add_metric([q.name, outcome], c[w])
        redelivered.add_metric([q.name], c[W_REDELIVERED])
        cumulative, acc = [], 0
        for le, w in zip(_LE, BUCKET_WORDS):
            acc += c[w]
            cumulative.append((le, acc))
        duration.add_metric([q.name], cumulative, c[W_DURATION_SUM])
        cumulative, acc = [], 0
        for le, w in zip(_LE, WAIT_BUCKET_WORDS):
            acc += c[w]
            cumulative.append((le, acc))
        wait.add_metric([q.name], cumulative, c[W_WAIT_SUM])
        for reason in RESTART_REASONS:
            restarts.add_metric([q.name, reason], q.restarts[reason])
        states = {W_STARTING: 0, W_IDLE: 0, W_BUSY: 0, W_PAUSED: 0, W_LIMITED: 0}
        for w in q.workers:
            if w.state in states:   # an idle draining worker is leaving: not capacity
                states[w.state] += 1
        in_flight.add_metric([q.name], states[W_BUSY])
        for state, n in states.items():
            workers.add_metric([q.name, state], n)
        lim = q.limits
        if lim is not None and lim.concurrency:
            cap.add_metric([q.name], lim.concurrency)
            held.add_metric([q.name], q.slots_held)
            limit_waiting.add_metric([q.name, "concurrency"], q.waiting_slot)
            limit_waited.add_metric([q.name, "concurrency"], c[W_LIMIT_WAITED_SLOT])
        if lim is not None and lim.rate:
            rate.add_metric([q.name], lim.rate)
            limit_waiting.add_metric([q.name, "rate"], q.waiting_token)
            limit_waited.add_metric([q.name, "rate"], c[W_LIMIT_WAITED_TOKEN])
            tokens.add_metric([q.name], c[W_LIMIT_TOKENS])
        if q.depth is not None:
            ready.add_metric([q.name], q.depth[0])
            consumers.add_metric([q.name], q.depth[1])
            dead.add_metric([q.name], q.depth[2])
    broker = GaugeMetricFamily("workqd_broker_connected",
                               "1 when the master reached the broker at its last poll.")
    broker.add_metric([], 1 if snap.broker_connected else 0)
    delayed = GaugeMetricFamily(
        "workqd_delayed_messages", "Messages waiting in the vhost's delay levels (retries, "
        "deferrals and delayed submissions of every queue), as last polled.")
    if snap.delayed is not None:
        delayed.add_metric([], snap.delayed)
    last_fired = GaugeMetricFamily(
        "workqd_schedule_last_fired_timestamp_seconds", "The newest slot of the schedule fired "
        "by any host, as this host last read it (seconds since the epoch).",
        labels=["schedule"])
    next_fire = GaugeMetricFamily(
        "workqd_schedule_next_fire_timestamp_seconds", "The schedule's next slot after the last "
        "one handled: in the past means overdue (seconds since the epoch).", labels=["schedule"])
    fired = CounterMetricFamily(
        "workqd_schedule_fired", "Firings of the schedule this host published (confirmed).",
        labels=["schedule"])
    leader = GaugeMetricFamily(
        "workqd_schedule_leader", "1 on the host that leads the schedule (fires it), else 0.",
        labels=["schedule"])
    for sc in snap.schedules:
        if sc.last_fired is not None:
            last_fired.add_metric([sc.name], sc.last_fired)
        if sc.next is not None:
            next_fire.add_metric([sc.name], sc.next)
        fired.add_metric([sc.name], sc.fired)
        leader.add_metric([sc.name], 1 if sc.leading else 0)
    build = GaugeMetricFamily("workqd_build_info", "workqd version, always 1.",
                              labels=["version"])
    build.add_metric([snap.version], 1)
    return (processed, redelivered, in_flight, duration, wait, restarts, workers, ready, consumers,
            dead, blocked, paused, size, least, most, cap, held, rate, limit_waiting, limit_waited,
            tokens, broker, delayed, last_fired, next_fire, fired, leader, build)


class _Collector:
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def collect(self):
        if self.snapshot is not None:
            yield from families(self.snapshot)


class Exposition:
    def __init__(self) -> None:
        self._collector = _Collector()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._collector)

    def render(self, snap: Snapshot, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics when ``accept`` asks for it
        (prometheus-client's own negotiation), else the text format."""
        encoder, content_type = choose_encoder(accept)
        self._collector.snapshot = snap
        try:
            return encoder(self._registry), content_type
        finally:
            self._collector.snapshot = None


def gzip_accepted(accept_encoding: str | None) -> bool:
    """As prometheus-client's own handler decides: gzip named in Accept-Encoding."""
    return "gzip" in [e.strip().split(";")[0] for e in (accept_encoding or "").split(",")]


def compress(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=1)   # fast: it runs in the master loop
