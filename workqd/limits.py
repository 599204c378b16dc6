"""Cluster-wide limits of a queue, as pure logic: rate parsing, the broker names the
limits live under, the token generator's schedule and the window arithmetic the
tests and benchmarks judge them by. The worker's side (probing, consuming tokens)
is in worker/limits.py; docs/limits.md says how both work on the broker.
"""

from __future__ import annotations

import math
import random
import re
from typing import Iterable, Sequence

# Units a rate may be given in, and their seconds.
UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0,
         "h": 3600.0, "hour": 3600.0}
MAX_RATE = 10_000.0     # tokens per second: each token is one publish and one delivery
MIN_RATE = 1 / 86400.0  # one a day: slower would never show in a poll
MAX_CONCURRENCY = 10_000
MAX_BURST = 10_000

# Name prefixes on the broker: one exclusive queue per held concurrency slot, one
# token queue and one generator lock per rate setting.
CAP_PREFIX = "workq.cap."
RATE_PREFIX = "workq.rate."

# A worker without a slot (or a generator lock) asks again after a random pause in
# this range, so the workers of many hosts do not probe in step.
PROBE_MIN, PROBE_MAX = 1.0, 2.0
# Tokens the generator publishes at most per turn of its clock: a generator that
# fell behind (a stalled loop) catches up by at most one burst, never floods.
GENERATOR_TICK = 0.02    # seconds between generator turns, for fast rates
# A task starts a little after its token was made: the token's delivery, the consumer's
# cancel and the hand-off to the handler thread, a few ms to a few tens of ms, and up
# to a quarter second on a loaded host. A token made just before a window opens can
# so start inside it, beside the window's own; generating exactly at the rate would
# let a window of starts hold a few more than the rate allows.
START_JITTER = 0.25      # seconds a start may trail its token, allowed for
# The window the guarantee is given for: starts in any GUARANTEE_WINDOW seconds or more
# stay within the rate (plus the burst). The generator runs this much under the rate
# so the jitter above fits inside every such window.
GUARANTEE_WINDOW = 10.0
RATE_MARGIN = GUARANTEE_WINDOW / (GUARANTEE_WINDOW + START_JITTER)
# Unused token queues of an old setting vanish after this long (x-expires).
TOKEN_QUEUE_EXPIRES_MS = 30 * 60 * 1000

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")


class RateError(ValueError):
    """A rate written in a form workqd does not read."""


def parse_rate(text: object) -> tuple[float, str]:
    """``"50/s"``, ``"300/min"``, ``"10/h"`` -> (tokens per second, the text normalised)."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise RateError(f'must be a rate such as "50/s", "300/min" or "10/h", got {text!r}')
    m = _RATE.match(text.lower())
    if not m or m.group(2) not in UNITS:
        raise RateError(f'must be a rate such as "50/s", "300/min" or "10/h", got {text!r}')
    count = float(m.group(1))
    per_second = count / UNITS[m.group(2)]
    if count <= 0 or per_second < MIN_RATE:
        raise RateError(f"must be at least one task a day, got {text!r}")
    if per_second > MAX_RATE:
        raise RateError(f"must be at most {MAX_RATE:g}/s, got {text!r}")
    unit = {"sec": "s", "second": "s", "minute": "min", "hour": "h"}.get(m.group(2), m.group(2))
    return per_second, f"{count:g}/{unit}"


def cap_queue(queue: str, k: int) -> str:
    """The exclusive queue whose holder may run one task of ``queue`` at a time."""
    return f"{CAP_PREFIX}{queue}.{k}"


def rate_key(rate_text: str, burst: int) -> str:
    """The setting in a queue name: daemons that agree on it share one bucket."""
    return rate_text.replace("/", "-per-") + f".b{burst}"


def token_queue(queue: str, rate_text: str, burst: int) -> str:
    return f"{RATE_PREFIX}{queue}.{rate_key(rate_text, burst)}"


def generator_lock(queue: str, rate_text: str, burst: int) -> str:
    return token_queue(queue, rate_text, burst) + ".generator"


def longest_name(queue: str, concurrency: int, rate_text: str | None, burst: int) -> str:
    """The longest broker name the limits of ``queue`` need (names are at most 255 bytes)."""
    names = [cap_queue(queue, concurrency)] if concurrency else []
    if rate_text:
        names.append(generator_lock(queue, rate_text, burst))
    return max(names, key=lambda n: len(n.encode()), default="")


def token_queue_arguments(burst: int) -> dict:
    """Quorum (tokens survive a node), at most ``burst`` ready, the oldest dropped."""
    return {"x-queue-type": "quorum", "x-max-length": burst, "x-overflow": "drop-head",
            "x-expires": TOKEN_QUEUE_EXPIRES_MS}


def probe_order(concurrency: int, rng: random.Random | None = None) -> list[int]:
    """Slot numbers 1..concurrency to try, from a random one on, so that probing
    workers spread over the free slots instead of all asking for slot 1 first."""
    if concurrency <= 0:
        return []
    start = (rng or random).randrange(concurrency)
    return [(start + i) % concurrency + 1 for i in range(concurrency)]


def probe_pause(rng: random.Random | None = None) -> float:
    return (rng or random).uniform(PROBE_MIN, PROBE_MAX)


def generated_rate(rate: float) -> float:
    """Tokens a second the generator makes for a limit of ``rate``: under it by the
    margin that keeps starts, jitter included, within the rate (RATE_MARGIN)."""
    return rate * RATE_MARGIN


def tokens_due(elapsed: float, rate: float, emitted: int, burst: int) -> int:
    """Tokens a generator that started ``elapsed`` seconds ago should publish now, having
    published ``emitted``: the schedule ``floor(elapsed * rate)`` never runs ahead of
    the rate, and after a stall at most ``burst`` go at once (the queue keeps no more)."""
    if elapsed < 0 or rate <= 0:
        return 0
    due = math.floor(elapsed * rate + 1e-9) - emitted
    return max(0, min(due, burst))


def tokens_to_publish(due: int, ready: int, burst: int) -> int:
    """Of ``due`` tokens, those that fit beside the ``ready`` ones under ``burst``; the
    rest would only be dropped by the queue's max-length."""
    return max(0, min(due, burst - ready))


def generator_wait(elapsed: float, rate: float, emitted: int) -> float:
    """Seconds until the generator's next token is due (at least one tick)."""
    next_at = (emitted + 1) / rate
    return max(GENERATOR_TICK, next_at - elapsed)


def window_bound(rate: float, burst: int, window: float) -> int:
    """The most starts a limit of ``rate`` lets into any ``window`` seconds, a start
    trailing its token by up to START_JITTER: the ``burst`` tokens the queue may hold
    when the window opens, plus those generated from START_JITTER before it to its
    end. For a window of GUARANTEE_WINDOW seconds or more it is at most
    ``burst + rate * window``."""
    return burst + math.floor((window + START_JITTER) * generated_rate(rate) + 1e-9)


def max_in_window(times: Iterable[float], window: float) -> int:
    """The most of ``times`` that fall in any half-open interval of ``window`` seconds."""
    ts = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ts):
        while ts[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def min_in_window(times: Sequence[float], window: float) -> int:
    """The fewest starts in any full ``window`` between the first and the last start."""
    ts = sorted(times)
    if not ts or ts[-1] - ts[0] < window:
        return 0
    worst, lo, hi = len(ts), 0, 0
    # Windows that start at each start: a window's count only drops right after a start.
    for lo, t in enumerate(ts):
        if t + window > ts[-1]:
            break
        while hi < len(ts) and ts[hi] < t + window:
            hi += 1
        worst = min(worst, hi - lo)
    return worst


def max_concurrent(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals (start, end) open at one instant; one ending as another
    starts does not overlap it."""
    spans = list(intervals)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans],
                    key=lambda x: (x[0], x[1]))
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def first_reaching(intervals: Iterable[tuple[float, float]], level: int,
                   after: float) -> float | None:
    """The first instant at or after ``after`` when ``level`` intervals are open at once."""
    spans = list(intervals)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans],
                    key=lambda x: (x[0], x[1]))
    now = 0
    for t, step in events:
        now += step
        if now >= level and t >= after:
            return t
    return None
