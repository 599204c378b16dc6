"""Delayed delivery on plain RabbitMQ: binary TTL levels shared by every queue of a vhost.

Level n is a queue whose every message waits exactly 2**n seconds (``x-message-ttl``)
and is then dead-lettered to level n-1's exchange; level 0's expiries go to the
delivery exchange, which hands each message to its work queue. A message carries
its remaining delay in its routing key, one word per level, most significant
first ("1.0.1..."): at each level's exchange a 1 sends it into that level's queue,
a 0 on to the next level down. A delay of d seconds thus waits in the levels of
d's set bits, in turn, and arrives after exactly d seconds.

Why this shape, and not a delay queue per delay or a plugin:

- Every message of a level has the same TTL, so the message at the head always
  expires first: RabbitMQ expires messages from the head, and a queue with mixed
  TTLs would hold a short delay behind a long one.
- Nothing is held unacked by a consumer, so the broker's ``consumer_timeout`` never
  touches a waiting task, and no daemon has to be up for time to pass.
- Levels are quorum queues with at-least-once dead-lettering: a message leaves a
  level only once the next one confirmed it, so losing a node while tasks wait
  loses none of them.
- RabbitMQ caps a TTL at 2**32 - 1 ms (49.7 days), so there are 23 levels, 2**0 to
  2**22 seconds: one pass covers up to 97 days in at most 23 hops and no new queue.
  A longer delay makes several passes: a copy that reaches its work queue before it
  is due is not run but sent through the levels again for the rest (intake.py).

The destination travels in a header (``x-workq-to``) and the delivery exchange is
a headers exchange with one binding per work queue: queue names may hold any
character, which topic patterns would read as wildcards. The bindings match with
``all-with-x``: plain ``all`` leaves every header starting with ``x-`` out of the
match, so a binding on ``x-workq-to`` alone would match every message and hand
each due task to every bound queue.

RabbitMQ drops a message that is dead-lettered into a queue it was dead-lettered
from before, unless a rejection happened in between (cycle detection). A task
retried through the same level twice would be dropped that way, so every copy
that enters the levels leaves its ``x-death`` history behind (``entry_headers``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

LEVELS = 23                         # 2**22 s is the longest TTL RabbitMQ takes
MAX_PASS = 2 ** LEVELS - 1          # seconds one pass through the levels can wait
MAX_DELAY = 100 * 366 * 86400       # seconds: a century is as far as a task may wait
PREFIX = "workq.delay"
DELIVER_EXCHANGE = f"{PREFIX}.deliver"
UNROUTED = f"{PREFIX}.unrouted"        # due tasks whose work queue no longer exists
H_TO = "x-workq-to"                 # the work queue a delayed message is for
H_DUE_MS = "x-workq-due-ms"         # when it is due, ms since the epoch (status, lateness)
# The broker's dead-lettering history: never carried into the levels (cycle detection).
DEATH_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue",
                 "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                 "x-last-death-reason")


def level_name(n: int) -> str:
    """The exchange and the queue of level n share this name."""
    return f"{PREFIX}.{n:02d}"


def whole_seconds(delay: float) -> int:
    """A delay as the whole seconds the levels can count, rounded up: never early."""
    if not math.isfinite(delay) or delay < 0:
        raise ValueError(f"a delay must be a finite number of seconds >= 0, got {delay!r}")
    seconds = math.ceil(delay)
    if seconds > MAX_DELAY:
        raise ValueError(f"a delay can be at most 100 years, got {delay:g} seconds")
    return seconds


def this_pass(seconds: int) -> int:
    """The part of a delay one pass through the levels waits."""
    return min(seconds, MAX_PASS)


def routing_key(seconds: int) -> str:
    """The delay's bits, one word per level, level LEVELS-1 first."""
    return ".".join("1" if seconds >> n & 1 else "0" for n in reversed(range(LEVELS)))


def levels_of(seconds: int) -> list[int]:
    """The levels a delay of ``seconds`` waits in, in the order it visits them."""
    return [n for n in reversed(range(LEVELS)) if seconds >> n & 1]


def entry_exchange(seconds: int) -> str:
    """Where a delayed message is published: the highest level it needs, so a short
    delay skips the empty levels above it."""
    top = max(seconds.bit_length() - 1, 0)
    return level_name(top)


def entry_headers(headers: dict | None, queue: str, due_ms: int) -> dict:
    """The headers of a copy entering the levels: the caller's, minus the broker's
    dead-letter history, plus where and when it is due."""
    out = {k: v for k, v in (headers or {}).items() if k not in DEATH_HEADERS}
    out[H_TO] = queue
    out[H_DUE_MS] = due_ms
    return out


def _pattern(n: int, bit: str) -> str:
    """A topic pattern matching keys whose word for level n is ``bit``."""
    position = LEVELS - 1 - n
    return ".".join(["*"] * position + [bit] + ["*"] * n)


class Exchange(NamedTuple):
    name: str
    type: str
    arguments: dict | None = None


class Level(NamedTuple):
    name: str
    arguments: dict


class Bind(NamedTuple):
    """``destination`` (a queue, or an exchange when ``to_exchange``) bound to ``source``;
    ``remove``: unbound instead (a binding of an earlier shape; unbinding one that does
    not exist is no error)."""
    source: str
    destination: str
    routing_key: str
    to_exchange: bool
    arguments: dict | None = None
    remove: bool = False


def level_arguments(n: int) -> dict:
    below = level_name(n - 1) if n else DELIVER_EXCHANGE
    return {"x-queue-type": "quorum", "x-message-ttl": (2 ** n) * 1000,
            "x-dead-letter-exchange": below,
            # At-least-once dead-lettering requires reject-publish overflow.
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


def topology() -> tuple[list[Exchange], list[Level], list[Bind]]:
    """Every exchange, level queue and binding of the vhost's delay levels; declared in
    this order, each binding finds both of its ends in place."""
    # A due task whose queue is gone (deleted while it waited) would otherwise be kept
    # by the broker's at-least-once dead-lettering and retried for ever, unseen: the
    # delivery exchange hands it to a queue of its own, where it waits for an operator.
    exchanges = [Exchange(UNROUTED, "fanout"),
                 Exchange(DELIVER_EXCHANGE, "headers", {"alternate-exchange": UNROUTED})]
    levels, binds = [], [Bind(UNROUTED, UNROUTED, "", to_exchange=False)]
    for n in range(LEVELS):
        name = level_name(n)
        below = level_name(n - 1) if n else DELIVER_EXCHANGE
        exchanges.append(Exchange(name, "topic"))
        levels.append(Level(name, level_arguments(n)))
        binds.append(Bind(name, name, _pattern(n, "1"), to_exchange=False))
        binds.append(Bind(name, below, _pattern(n, "0"), to_exchange=True))
    # Last, so levels[n] is level n; its binding, first, comes after every queue.
    levels.append(Level(UNROUTED, {"x-queue-type": "quorum"}))
    return exchanges, levels, binds


def delivery_binding(queue: str) -> Bind:
    """The binding that brings a work queue its due messages."""
    return Bind(DELIVER_EXCHANGE, queue, "", to_exchange=False,
                arguments={"x-match": "all-with-x", H_TO: queue})


def stray_delivery_binding(queue: str) -> Bind:
    """Removes the binding an earlier build made with ``x-match: all``, which matched
    every due message (x- headers are left out of that match) whatever its queue."""
    return Bind(DELIVER_EXCHANGE, queue, "", to_exchange=False,
                arguments={"x-match": "all", H_TO: queue}, remove=True)


def declare(channel) -> None:
    """Declare the levels on a pika BlockingChannel (idempotent; each call re-asserts)."""
    exchanges, levels, binds = topology()
    for ex in exchanges:
        channel.exchange_declare(ex.name, ex.type, durable=True, arguments=ex.arguments)
    for level in levels:
        channel.queue_declare(level.name, durable=True, arguments=level.arguments)
    for b in binds:
        bind(channel, b)


def bind(channel, b: Bind) -> None:
    if b.remove:
        channel.queue_unbind(b.destination, b.source, routing_key=b.routing_key,
                             arguments=b.arguments)
    elif b.to_exchange:
        channel.exchange_bind(b.destination, b.source, routing_key=b.routing_key)
    else:
        channel.queue_bind(b.destination, b.source, routing_key=b.routing_key,
                           arguments=b.arguments)


def prepare(channel, queue: str) -> None:
    """On a pika BlockingChannel: the levels, a check that ``queue`` exists (a delayed
    task for a missing queue would only be found missing when due), and its delivery
    binding. Raises pika's ChannelClosedByBroker (404) for a missing queue."""
    declare(channel)
    channel.queue_declare(queue, passive=True)
    bind(channel, stray_delivery_binding(queue))
    bind(channel, delivery_binding(queue))


def routed(queue: str, headers: dict | None, seconds_ahead: float, due_ms: int
           ) -> tuple[str, str, dict]:
    """(exchange, routing key, headers) of a task due in ``seconds_ahead`` seconds."""
    seconds = this_pass(whole_seconds(seconds_ahead))
    return entry_exchange(seconds), routing_key(seconds), entry_headers(headers, queue, due_ms)
