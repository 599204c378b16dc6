"""Prometheus exposition; the only module that imports prometheus_client.

Nothing is counted here: at scrape time the master's latest ``Snapshot``
(state.py) becomes rows of the families below. So the hot path pays nothing
for metrics, a dead worker's series vanish with it, and its counters live on
in the master's totals (see slots.py).

A scrape of a daemon with many queues has thousands of samples, and
prometheus-client formats each one from scratch (sorting and escaping its
labels, building a sample object). The master's loop would spend tens of
milliseconds per scrape on that, so the text is written from a cache instead:
for each series and each format that content negotiation picks, the lines
prometheus-client itself writes for that series, with a marker value in place
of each number, are cut into what comes before the number. A scrape then only
formats the numbers (with prometheus-client's own float formatting), and only
for the series whose numbers changed since the last scrape. The
library stays the authority on the format: a format whose lines do not have
that shape is rendered by the library in full, every time.
"""

from __future__ import annotations

import functools
import gzip
from itertools import accumulate

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
_KINDS = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
          "histogram": HistogramMetricFamily}
FAMILIES: list[tuple[str, str, str, tuple[str, ...]]] = []   # (kind, name, help, labels)


def _family(kind: str, name: str, documentation: str, labels=()) -> int:
    """Declare a family; its number indexes the rows ``rows`` returns."""
    FAMILIES.append((kind, name, documentation, tuple(labels)))
    return len(FAMILIES) - 1


PROCESSED = _family("counter",
    "workqd_tasks_processed", "Tasks settled, by outcome (success, retry, dead_letter, "
    "timeout, deferred, expired, cancelled).", ["queue", "outcome"])
REDELIVERED = _family("counter",
    "workqd_tasks_redelivered", "Deliveries that arrived with redelivered=true: the task "
    "may have run before (worker killed, connection lost).", ["queue"])
IN_FLIGHT = _family("gauge",
    "workqd_tasks_in_flight", "Tasks being run by a handler now.", ["queue"])
DURATION = _family("histogram",
    "workqd_task_duration_seconds", "Time the handler ran, per settled task.",
    ["queue"])
WAIT = _family("histogram",
    "workqd_task_queue_wait_seconds", "Time from publish to the start of the handler, for "
    "first deliveries of first tries: workq-submit's millisecond stamp, else the "
    "timestamp property (whole seconds).", ["queue"])
RESTARTS = _family("counter",
    "workqd_worker_restarts", "Workers replaced, by reason (crash, recycle, timeout, "
    "consumer_timeout, cancelled, reload).", ["queue", "reason"])
WORKERS = _family("gauge",
    "workqd_workers", "Worker processes by state (starting, idle, busy, paused, limited: "
    "waiting for a concurrency slot).",
    ["queue", "state"])
READY = _family("gauge",
    "workqd_queue_messages_ready", "Messages ready in the queue, as last polled by the "
    "master.", ["queue"])
CONSUMERS = _family("gauge",
    "workqd_queue_consumers", "Consumers of the queue on the broker (all hosts), as last "
    "polled.", ["queue"])
DEAD = _family("gauge",
    "workqd_dead_letter_messages", "Messages waiting in the queue's dead-letter queue "
    "<queue>.dead, as last polled.", ["queue"])
BLOCKED = _family("gauge",
    "workqd_publishing_blocked", "Workers whose publishing connection the broker blocks "
    "(memory or disk alarm): their retries and dead letters wait.", ["queue"])
PAUSED = _family("gauge",
    "workqd_queue_paused", "1 while the queue is paused (workqctl pause or quiet): its "
    "workers run what they hold and take nothing new.", ["queue"])
SIZE = _family("gauge",
    "workqd_pool_size", "Workers the pool keeps: the config's, or workqctl scale's until "
    "the next reload.", ["queue"])
LEAST = _family("gauge",
    "workqd_pool_min_workers", "The pool's configured minimum (its size when not "
    "autoscaled).", ["queue"])
MOST = _family("gauge",
    "workqd_pool_max_workers", "The pool's configured maximum (its size when not "
    "autoscaled).", ["queue"])
CAP = _family("gauge",
    "workqd_limit_concurrency",
    "The queue's cluster-wide concurrency cap (limits.concurrency).",
    ["queue"])
HELD = _family("gauge",
    "workqd_limit_slots_held", "Concurrency slots of the queue held by this host's workers.",
    ["queue"])
RATE = _family("gauge",
    "workqd_limit_rate", "The queue's cluster-wide rate limit, in task starts per second.",
    ["queue"])
LIMIT_WAITING = _family("gauge",
    "workqd_limit_waiting", "Held back by a cluster-wide limit now: workers waiting for a "
    "concurrency slot (limit=concurrency), tasks waiting for a rate token (limit=rate).",
    ["queue", "limit"])
LIMIT_WAITED = _family("counter",
    "workqd_limit_wait_seconds", "Seconds spent waiting for a limit: by workers for a "
    "concurrency slot, by tasks for a rate token.", ["queue", "limit"])
TOKENS = _family("counter",
    "workqd_limit_tokens_taken", "Rate tokens this host's workers took (one per task "
    "start).", ["queue"])
BROKER = _family("gauge", "workqd_broker_connected",
                 "1 when the master reached the broker at its last poll.")
DELAYED = _family(
    "gauge", "workqd_delayed_messages", "Messages waiting in the vhost's delay levels (retries, "
    "deferrals and delayed submissions of every queue), as last polled.")
LAST_FIRED = _family(
    "gauge", "workqd_schedule_last_fired_timestamp_seconds", "The newest slot of the schedule "
    "fired by any host, as this host last read it (seconds since the epoch).", ["schedule"])
NEXT_FIRE = _family(
    "gauge", "workqd_schedule_next_fire_timestamp_seconds", "The schedule's next slot after the "
    "last one handled: in the past means overdue (seconds since the epoch).", ["schedule"])
FIRED = _family(
    "counter", "workqd_schedule_fired", "Firings of the schedule this host published "
    "(confirmed).", ["schedule"])
LEADER = _family(
    "gauge", "workqd_schedule_leader", "1 on the host that leads the schedule (fires it), "
    "else 0.", ["schedule"])
BUILD = _family("gauge", "workqd_build_info", "workqd version, always 1.", ["version"])

_STATES = (W_STARTING, W_IDLE, W_BUSY, W_PAUSED, W_LIMITED)
_OUTCOMES = tuple(zip(OUTCOMES, OUTCOME_WORDS))


def _cumulative(c, words) -> tuple:
    return tuple(accumulate(map(c.__getitem__, words)))


def rows(snap: Snapshot) -> list[list[tuple[tuple, tuple]]]:
    """Per family (in FAMILIES order), its series: (label values, values). A histogram's
    values are its cumulative bucket counts (BUCKETS, then +Inf) and then its sum."""
    out: list[list] = [[] for _ in FAMILIES]
    (processed, redelivered, in_flight, duration, wait, restarts, workers, ready, consumers,
     dead, blocked, paused, size, least, most, cap, held, rate, limit_waiting, limit_waited,
     tokens, broker, delayed, last_fired, next_fire, fired, leader, build) = (out[i] for i in (
        PROCESSED, REDELIVERED, IN_FLIGHT, DURATION, WAIT, RESTARTS, WORKERS, READY, CONSUMERS,
        DEAD, BLOCKED, PAUSED, SIZE, LEAST, MOST, CAP, HELD, RATE, LIMIT_WAITING, LIMIT_WAITED,
        TOKENS, BROKER, DELAYED, LAST_FIRED, NEXT_FIRE, FIRED, LEADER, BUILD))
    for q in snap.queues:
        name = q.name
        one = (name,)
        least.append((one, (q.min_workers,)))
        most.append((one, (q.max_workers,)))
        blocked.append((one, (q.blocked,)))
        paused.append((one, (1 if q.paused else 0,)))
        size.append((one, (q.size,)))
        c = q.counters
        for outcome, w in _OUTCOMES:
            processed.append(((name, outcome), (c[w],)))
        redelivered.append((one, (c[W_REDELIVERED],)))
        duration.append((one, (*_cumulative(c, BUCKET_WORDS), c[W_DURATION_SUM])))
        wait.append((one, (*_cumulative(c, WAIT_BUCKET_WORDS), c[W_WAIT_SUM])))
        r = q.restarts
        for reason in RESTART_REASONS:
            restarts.append(((name, reason), (r[reason],)))
        states = dict.fromkeys(_STATES, 0)
        for w in q.workers:
            if w.state in states:   # an idle draining worker is leaving: not capacity
                states[w.state] += 1
        in_flight.append((one, (states[W_BUSY],)))
        for state, n in states.items():
            workers.append(((name, state), (n,)))
        lim = q.limits
        if lim is not None and lim.concurrency:
            cap.append((one, (lim.concurrency,)))
            held.append((one, (q.slots_held,)))
            limit_waiting.append(((name, "concurrency"), (q.waiting_slot,)))
            limit_waited.append(((name, "concurrency"), (c[W_LIMIT_WAITED_SLOT],)))
        if lim is not None and lim.rate:
            rate.append((one, (lim.rate,)))
            limit_waiting.append(((name, "rate"), (q.waiting_token,)))
            limit_waited.append(((name, "rate"), (c[W_LIMIT_WAITED_TOKEN],)))
            tokens.append((one, (c[W_LIMIT_TOKENS],)))
        if q.depth is not None:
            ready.append((one, (q.depth[0],)))
            consumers.append((one, (q.depth[1],)))
            dead.append((one, (q.depth[2],)))
    broker.append(((), (1 if snap.broker_connected else 0,)))
    if snap.delayed is not None:
        delayed.append(((), (snap.delayed,)))
    for sc in snap.schedules:
        one = (sc.name,)
        if sc.last_fired is not None:
            last_fired.append((one, (sc.last_fired,)))
        if sc.next is not None:
            next_fire.append((one, (sc.next,)))
        fired.append((one, (sc.fired,)))
        leader.append((one, (1 if sc.leading else 0,)))
    build.append(((snap.version,), (1,)))
    return out


def _metric(number: int, series) -> object:
    """Family ``number`` with ``series`` as prometheus-client's metric object."""
    kind, name, documentation, labels = FAMILIES[number]
    family = _KINDS[kind](name, documentation, labels=list(labels))
    for values, numbers in series:
        if kind == "histogram":
            family.add_metric(list(values), list(zip(_LE, numbers[:-1])), numbers[-1])
        else:
            family.add_metric(list(values), numbers[0])
    return family


def families(snap: Snapshot) -> list:
    """The snapshot as prometheus-client metric families."""
    return [_metric(i, series) for i, series in enumerate(rows(snap))]


class _Metrics:
    """A registry stand-in for the encoders: they only call ``collect``."""

    def __init__(self, metrics) -> None:
        self.metrics = metrics

    def collect(self):
        return iter(self.metrics)


class _Unfit(Exception):
    """The encoder's lines are not "<text> <number>\\n": render with the library."""


class _Format:
    """One output format: its family headers and every series' line prefixes, as the
    encoder writes them, learnt once per series; and each series' text, rewritten
    only when its numbers change."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.trailer = encoder(_Metrics([])).decode("utf-8")
        self.headers = [self._strip(encoder(_Metrics([_metric(i, ())])))
                        for i in range(len(FAMILIES))]
        self.series: dict[tuple[int, tuple], _Series] = {}   # by (family, label values)

    def _strip(self, text: bytes) -> str:
        text = text.decode("utf-8")
        if not text.endswith(self.trailer):
            raise _Unfit("no common trailer")
        return text[:len(text) - len(self.trailer)]

    def learn(self, number: int, values: tuple, width: int) -> "_Series":
        """The (prefix, index into the series' values) of each line of one series."""
        # Markers: 1..n for the values (a histogram's buckets count up to n), and
        # one-half for a histogram's sum, so every marker tells which value it is.
        markers = tuple(range(1, width + 1))
        if FAMILIES[number][0] == "histogram":
            markers = markers[:-1] + (0.5,)
        text = self._strip(self.encoder(_Metrics([_metric(number, [(values, markers)])])))
        if not text.startswith(self.headers[number]):
            raise _Unfit("header differs")
        lines = []
        for line in text[len(self.headers[number]):].splitlines(keepends=True):
            prefix, space, value = line.rpartition(" ")
            if not space or not line.endswith("\n"):
                raise _Unfit(f"line {line!r}")
            try:
                index = markers.index(float(value))
            except ValueError:
                raise _Unfit(f"value of {line!r}") from None
            lines.append((prefix + " ", index))
        if not lines:
            raise _Unfit("no line")
        entry = _Series(tuple(lines))
        if len(self.series) >= _MAX_SERIES:
            self.series.clear()   # queues and schedules come and go: stay bounded
        self.series[(number, values)] = entry
        return entry

    def render(self, all_rows) -> bytes:
        out: list[str] = []
        append = out.append
        known = self.series
        for number, series in enumerate(all_rows):
            append(self.headers[number])
            for values, numbers in series:
                entry = known.get((number, values))
                if entry is None:
                    entry = self.learn(number, values, len(numbers))
                # Most series of a daemon with many queues are idle: same numbers, same text.
                if numbers != entry.numbers:
                    entry.numbers = numbers
                    entry.text = "".join([f"{prefix}{_number(numbers[index])}\n"
                                          for prefix, index in entry.lines])
                append(entry.text)
        append(self.trailer)
        return "".join(out).encode("utf-8")


class _Series:
    """One series in one format: its lines' prefixes, and its text at the last scrape."""

    __slots__ = ("lines", "numbers", "text")

    def __init__(self, lines: tuple) -> None:
        self.lines = lines       # (prefix, index into the series' values) per line
        self.numbers: tuple | None = None
        self.text = ""


_MAX_SERIES = 100_000


@functools.lru_cache(maxsize=4096)
def _number(value) -> str:
    """prometheus-client's float formatting; the same few values recur from scrape to scrape."""
    return floatToGoString(value)


class Exposition:
    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)
        self._formats: dict[object, _Format | None] = {}   # None: the library renders it

    def collect(self):
        if self._snapshot is not None:
            yield from families(self._snapshot)

    def render(self, snap: Snapshot, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics when ``accept`` asks for it
        (prometheus-client's own negotiation), else the text format."""
        encoder, content_type = choose_encoder(accept)
        key = _encoder_key(encoder)
        fmt = self._formats.get(key, False)
        if fmt is False:
            fmt = self._formats[key] = self._format(encoder)
        if fmt is not None:
            try:
                return fmt.render(rows(snap)), content_type
            except _Unfit:
                self._formats[key] = None
        self._snapshot = snap
        try:
            return encoder(self._registry), content_type
        finally:
            self._snapshot = None

    @staticmethod
    def _format(encoder) -> _Format | None:
        try:
            return _Format(encoder)
        except (_Unfit, UnicodeError):
            return None


def _encoder_key(encoder) -> object:
    """Equal for encoders that write the same: choose_encoder may hand out a new partial
    (with the negotiated version and escaping) per request."""
    if isinstance(encoder, functools.partial):
        return (encoder.func, encoder.args, tuple(sorted(encoder.keywords.items())))
    return encoder


def gzip_accepted(accept_encoding: str | None) -> bool:
    """As prometheus-client's own handler decides: gzip named in Accept-Encoding."""
    return "gzip" in [e.strip().split(";")[0] for e in (accept_encoding or "").split(",")]


def compress(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=1)   # fast: it runs in the master loop
