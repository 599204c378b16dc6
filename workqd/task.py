"""The handler API: what a Python handler receives and what it may raise.

``function(body: bytes, task: Task)`` returns on success and raises on failure;
``Reject`` and ``RetryLater`` say more than a plain failure. The worker's intake
builds the Task and the runner calls the handler; both import this module and
neither imports the other, and a handler that writes ``from workqd import Reject``
loads only this page, not the worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# The longest wait RetryLater(delay=) gives a task: a century, as for a submitted delay.
MAX_RETRY_LATER = 100 * 366 * 86400

# Basic properties copied into Task.properties (headers are Task.headers).
PROPERTIES = ("content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
              "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id",
              "cluster_id")


@dataclass(slots=True)
class Task:
    """What a handler learns about the message it runs."""
    message_id: str
    queue: str
    headers: dict = field(default_factory=dict)
    redelivered: bool = False
    delivery_count: int = 0   # earlier deliveries (quorum x-delivery-count), 0 on the first
    attempt: int = 1          # try number across retries (x-workq-attempt)
    # time.monotonic() by which the handler must be done, set when its run starts
    # (CLOCK_MONOTONIC: the same clock in every process of the machine).
    deadline: float = 0.0
    routing_key: str = ""     # as published; "" when unknown
    exchange: str = ""        # "" is the default exchange
    props: object = None      # the delivery's pika properties, read only when asked (below)

    @property
    def properties(self) -> dict:
        """AMQP basic properties but headers, the set ones only. Built on demand: most
        handlers never ask, and building it for every task costs the hot path."""
        return properties_of(self.props) if self.props is not None else {}


class Reject(Exception):
    """Raised by a handler for a task no retry can fix (bad input): the task is
    dead-lettered at once with reason ``rejected``. ``args[0]`` is the reason shown."""


class RetryLater(Exception):
    """Raised by a handler that could not attempt the task now (a service it needs is
    down): the task waits the backoff delay, or ``delay`` seconds when the handler knows
    when to come back, and comes back without using up a try, at most
    ``retry.max_deferrals`` times; after that it counts as a failure.
    ``args[0]`` is the reason shown."""

    def __init__(self, *args, delay: float | None = None):
        super().__init__(*args)
        if delay is not None:
            if isinstance(delay, bool) or not isinstance(delay, (int, float)) \
                    or not math.isfinite(delay) or delay < 0:
                raise ValueError(f"RetryLater(delay=) takes seconds >= 0, got {delay!r}")
            delay = float(min(delay, MAX_RETRY_LATER))
        self.delay = delay


def properties_of(props) -> dict:
    """The properties the publisher set; whatever pika decoded, never an exception."""
    out = {}
    for name in PROPERTIES:
        value = getattr(props, name, None)
        if value is not None:
            out[name] = value if isinstance(value, (int, str)) else text(value)
    return out


def text(value) -> str:
    """A header or property value as text: bytes decoded leniently, None as ""."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
