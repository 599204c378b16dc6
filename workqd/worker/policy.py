"""What the broker must see for a finished task: a pure function, no I/O.

A success is acked. A failure or timeout with attempts left becomes a copy for
the work queue, delayed by the backoff for the next try (the settler sends it
through the vhost's delay levels, delays.py); a deferral (``workqd.RetryLater``,
exit status 75) a delayed copy for the same try, ``retry.max_deferrals`` times at
most, then it counts as a failure; without attempts left, or for a reason that no
retry can fix (poison, too large, malformed, expired, cancelled, or the handler's
own verdict: ``workqd.Reject``, exit status 65), a copy on ``<queue>.dead``.
Either copy is published with a confirm and the original acked only after it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from .. import vocab
from ..config import Queue


@dataclass(frozen=True)
class Settlement:
    metric: int | None     # vocab outcome counted once the broker has it; None: not an
                           # outcome (a copy sent round the levels because it came early)
    target: str | None     # queue for the copy; None means a plain ack
    headers: dict          # headers of the copy
    final: bool            # no further try follows (told to --wait)
    delay: float = 0.0     # seconds before the copy is due in ``target``
    due_ms: int | None = None   # when it is due (ms since the epoch); None: now + delay
    # No copy: nack without requeue, so the queue's own dead-lettering (someone else's
    # x-dead-letter-exchange) takes it, or the broker drops it (declare_side_queues: false).
    reject: bool = False


ACK = Settlement(vocab.SUCCESS, None, {}, True)   # one object for every success: the hot path


def decide(queue: Queue, attempt: int, headers: dict, outcome: int, error: str,
           reason: str | None = None, now: datetime.datetime | None = None,
           defer_for: float | None = None) -> Settlement:
    """``outcome`` is what the handler did (SUCCESS, RETRY for a failure, TIMEOUT,
    DEAD_LETTER when it rejected the task, DEFERRED when it asked to retry later);
    ``reason`` is set when the worker refused the task unrun (poison, too large, ...);
    ``defer_for``: the seconds a deferring handler asked for (``RetryLater(delay=)``),
    instead of the backoff."""
    if outcome == vocab.SUCCESS and reason is None:
        return ACK
    if outcome == vocab.DEAD_LETTER and reason is None:
        reason = vocab.REASON_REJECTED
    unrun = vocab.REASON_OUTCOMES.get(reason)   # expired, cancelled: outcomes of their own
    if not queue.declare_side_queues:
        metric = unrun if unrun is not None else (
            vocab.TIMEOUT if outcome == vocab.TIMEOUT else vocab.DEAD_LETTER)
        return Settlement(metric, None, {}, True, reject=True)
    # The copy is a new message to the broker: its delivery count starts afresh.
    copy = {k: v for k, v in headers.items() if k != vocab.H_DELIVERY_COUNT}
    error = error[:vocab.MAX_ERROR_TEXT]
    retryable = reason is None
    if outcome == vocab.DEFERRED and retryable:
        deferrals = headers.get(vocab.H_DEFERRALS, 0)
        if not isinstance(deferrals, int) or isinstance(deferrals, bool) or deferrals < 0:
            deferrals = queue.retry.max_deferrals   # unreadable: no more deferrals, bounded
        if deferrals < queue.retry.max_deferrals:
            delay = (defer_for if defer_for is not None
                     else queue.retry.delay_before(attempt + 1))
            copy[vocab.H_ATTEMPT] = attempt
            copy[vocab.H_DEFERRALS] = deferrals + 1
            copy[vocab.H_ERROR] = error
            return Settlement(vocab.DEFERRED, queue.name, copy, False, delay)
        # Out of deferrals: from here on a failure like any other, so it cannot loop.
        outcome = vocab.RETRY
        error = f"{error} (deferred {deferrals} time(s): retry.max_deferrals)"[
            :vocab.MAX_ERROR_TEXT]
    if retryable and attempt < queue.retry.attempts:
        delay = queue.retry.delay_before(attempt + 1)
        copy[vocab.H_ATTEMPT] = attempt + 1
        copy[vocab.H_ERROR] = error
        metric = vocab.TIMEOUT if outcome == vocab.TIMEOUT else vocab.RETRY
        return Settlement(metric, queue.name, copy, False, delay)
    if reason is None:
        reason = vocab.REASON_TIMEOUT if outcome == vocab.TIMEOUT else vocab.REASON_FAILED
    now = now or datetime.datetime.now(datetime.timezone.utc)
    copy.update({vocab.H_REASON: reason, vocab.H_ERROR: error, vocab.H_ATTEMPT: attempt,
                 vocab.H_QUEUE: queue.name,
                 vocab.H_DEAD_AT: now.isoformat(timespec="seconds")})
    metric = unrun if unrun is not None else (
        vocab.TIMEOUT if outcome == vocab.TIMEOUT else vocab.DEAD_LETTER)
    return Settlement(metric, vocab.dead_letter_queue(queue.name), copy, True)


def postpone(queue: Queue, headers: dict, seconds_left: float, due_ms: int) -> Settlement:
    """A task delivered before it is due (a delay longer than one pass through the
    levels, or a publisher's clock ahead of ours): a copy through the levels for the
    rest of its wait. Not an outcome: the task has not run."""
    copy = {k: v for k, v in headers.items() if k != vocab.H_DELIVERY_COUNT}
    return Settlement(None, queue.name, copy, False, seconds_left, due_ms)
