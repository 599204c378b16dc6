"""Reading a delivery into a Task without ever raising: the message is someone else's input.

Any header a publisher can set is checked for type and range here, before the
worker acts on it. What cannot be read is either ignored with a documented
fallback (``x-delivery-count``: the broker's own counter, only trusted as a
whole number) or makes the task ``malformed``: dead-lettered unrun, with the
header named, instead of a loop of connection aborts. A value pika itself could
not decode arrives here as a marker (frames.py) and makes the task malformed too.
"""

from __future__ import annotations

import hashlib

from .. import frames, vocab
from ..msgid import stamp_ms
from ..task import Task, text as _text

MAX_ATTEMPT = 1_000_000


class Delivery:
    """One message between arrival and settlement; I/O thread only, except that the
    handler thread reads ``body``, ``props`` and ``task`` (never written after intake
    but for ``task.deadline``, which the handler thread alone writes and reads),
    writes the run fields below, and ``acked`` under the transport's lock."""

    __slots__ = ("settler", "tag", "body", "props", "task", "abandoned", "duration", "error",
                 "started", "outcome", "ran_for", "failure", "defer_for", "acked", "counted")

    def __init__(self, settler, tag: int, body: bytes, props, task: Task):
        self.settler = settler    # of the channel it came on; dies with that channel
        self.tag = tag
        self.body = body
        self.props = props
        self.task = task
        self.abandoned = False    # settled without the handler (timeout): ignore its result
        self.duration = 0.0       # seconds the handler ran, once it returned
        self.error = ""           # one line, for the copy's header and --wait
        # The handler thread's, written once per run (handler.py): ``started`` (its
        # time.monotonic()) before it publishes this delivery as running; the result
        # (``outcome``, seconds ``ran_for``, ``failure`` line) before it hands the
        # delivery back. Separate from ``duration``/``error``, which the I/O thread
        # writes, so that a late result cannot change a task settled as timed out.
        self.started = 0.0
        self.outcome = 0          # vocab.SUCCESS, RETRY, TIMEOUT, DEAD_LETTER or DEFERRED
        self.ran_for = 0.0
        self.failure = ""
        self.defer_for = None     # seconds a RetryLater(delay=) asked for; None: the backoff
        # Its ack went out from the handler thread (settle.py, ack_from_handler), and
        # the success was counted there first; set under the transport's lock, as
        # ``abandoned`` is when a handler is given up on.
        self.acked = False
        self.counted = False


def published_at(props, now: float) -> float | None:
    """When the task was published: the millisecond header, else the time a version 7
    message id carries (workqd's own ids, workqd.msgid), else the timestamp property
    (whole seconds, any producer); None when none is usable."""
    # Once per task: exact type tests (which also rule out bool).
    headers = props.headers
    if type(headers) is dict:
        ms = headers.get(vocab.H_SUBMITTED_MS)
        if type(ms) is int and 0 < ms < 1 << 50:
            return ms / 1000.0
    ms = stamp_ms(props.message_id, int(now * 1000))
    if ms is not None:
        return ms / 1000.0
    ts = props.timestamp
    if type(ts) is int and 0 < ts < 1 << 40:
        return float(ts)
    return None


def message_id_of(props, body: bytes) -> str:
    """The message id, or a digest of the body for messages published without one."""
    mid = props.message_id
    if mid:
        return mid if isinstance(mid, str) else str(mid)
    return "sha1:" + hashlib.sha1(body).hexdigest()[:20]


def read_task(queue: str, redelivered: bool, props, body: bytes, routing_key="",
              exchange="") -> tuple[Task, str | None]:
    """The task, and a one-line problem when a workqd header is unreadable.

    The I/O thread runs this for every delivery (at prefetch 50 it is the busy thread),
    so the common case, a str routing key and no headers, builds the Task in one call."""
    mid = message_id_of(props, body)
    if type(routing_key) is not str:
        routing_key = _text(routing_key)
    if type(exchange) is not str:
        exchange = _text(exchange)
    headers = props.headers
    # Values the decode guard replaced: the task cannot be run as its producer meant it.
    undecodable = getattr(props, frames.ATTR, None)
    if not headers or not isinstance(headers, dict):
        return Task(mid, queue, {}, bool(redelivered), 0, 1, 0.0, routing_key, exchange,
                    props), (frames.describe(undecodable) if undecodable else None)
    count = headers.get(vocab.H_DELIVERY_COUNT, 0)
    if not _whole(count) or count < 0:
        count = 0  # not the broker's: a publisher's header on a classic queue means nothing
    problem = frames.describe(undecodable) if undecodable else None
    attempt = headers.get(vocab.H_ATTEMPT, 1)
    if isinstance(attempt, (str, bytes)):
        attempt = _number(attempt)
    if not _whole(attempt) or not 1 <= attempt <= MAX_ATTEMPT:
        problem = problem or (f"header {vocab.H_ATTEMPT} must be a whole number from 1 to "
                              f"{MAX_ATTEMPT}, got {_show(attempt)}")
        attempt = 1
    return Task(mid, queue, headers, bool(redelivered), count, attempt, 0.0, routing_key,
                exchange, props), problem


def unreadable_task(queue: str, redelivered: bool, props, body: bytes,
                    error: Exception) -> tuple[Task, str]:
    """The task of a delivery ``read_task`` choked on: headers pika decoded but this
    code could not read. Malformed, with headers pika can encode on its copy."""
    try:
        mid = message_id_of(props, body)
    except Exception:
        mid = "sha1:" + hashlib.sha1(body).hexdigest()[:20]
    headers = frames.safe_headers(getattr(props, "headers", None))
    text = str(error)
    text = text if len(text) <= 200 else text[:197] + "..."
    problem = f"headers cannot be read ({type(error).__name__}: {text})"
    return Task(mid, queue, headers, bool(redelivered), 0, 1, 0.0, "", "", props), problem


def _number(text):
    """A whole number written as text ("3"), else ``text`` unchanged. int() alone would
    raise on digits it does not take ("²" passes str.isdigit)."""
    try:
        return int(text)
    except ValueError:
        return text


def size_problem(body: bytes, max_body: int) -> str | None:
    if max_body and len(body) > max_body:
        return f"body of {len(body)} bytes exceeds max_body ({max_body})"
    return None


def poison_problem(crashes: int, returns: int, limit: int) -> str | None:
    """Why a redelivered task is poison, or None: ``crashes`` are worker deaths the master
    saw while it ran, ``returns`` the broker's earlier deliveries (quorum queues)."""
    if max(crashes, returns) < limit:
        return None
    if crashes >= returns:
        return f"poison: killed its worker {crashes} time(s)"
    return f"poison: delivered {returns + 1} times without being acked"


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
