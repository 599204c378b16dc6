"""The words workqd and its operators share: outcomes, reasons, headers, side queues.

Every module that names an outcome, a dead-letter reason, a restart reason, a
header or a side queue takes it from here, so the metric labels, the log lines,
the headers on dead letters and the man pages cannot drift apart.
"""

from __future__ import annotations

# Settlement outcomes, in the order of the shared-memory counters (slots.py)
# and of the `outcome` label of workqd_tasks_processed_total.
# deferred: the handler could not attempt the task now (RetryLater, exit 75); it waits
# a backoff delay and comes back without using up a try.
# expired: delivered after its x-workq-expires-ms, dead-lettered unrun.
# cancelled: cancelled by its message id before it ran, dead-lettered unrun.
# New outcomes go at the end: the counters' positions must not move.
SUCCESS, RETRY, DEAD_LETTER, TIMEOUT, DEFERRED, EXPIRED, CANCELLED = range(7)
OUTCOMES = ("success", "retry", "dead_letter", "timeout", "deferred", "expired", "cancelled")

# Why a task went to <queue>.dead (header x-workq-reason).
REASON_FAILED = "failed"        # the handler failed on its last attempt
REASON_TIMEOUT = "timeout"      # ran past `timeout` on its last attempt
REASON_POISON = "poison"        # killed its worker max_redeliveries times
REASON_TOO_LARGE = "too-large"  # body larger than max_body
REASON_MALFORMED = "malformed"  # a workqd header the worker cannot read
REASON_REJECTED = "rejected"    # the handler said no retry can help (workqd.Reject, exit 65)
REASON_EXPIRED = "expired"      # delivered after its deadline (x-workq-expires-ms), never run
REASON_CANCELLED = "cancelled"  # cancelled by message id before it ran (workqctl cancel)
DEAD_LETTER_REASONS = (REASON_FAILED, REASON_TIMEOUT, REASON_POISON, REASON_TOO_LARGE,
                       REASON_MALFORMED, REASON_REJECTED, REASON_EXPIRED, REASON_CANCELLED)
# Reasons that are outcomes of their own, counted apart from dead_letter.
REASON_OUTCOMES = {REASON_EXPIRED: EXPIRED, REASON_CANCELLED: CANCELLED}

# A command handler exiting with this status rejects its task: dead-lettered at
# once, never retried. 65 is EX_DATAERR of sysexits.h, "the input data was incorrect".
EXIT_REJECT = 65
# A command handler exiting with this status defers its task (RetryLater): 75 is
# EX_TEMPFAIL, "a temporary failure ... the user is invited to retry later".
EXIT_RETRY_LATER = 75

# Why the master replaced a worker (label of workqd_worker_restarts_total).
# consumer_timeout: the broker closed the channel because a task stayed unacked
# past its consumer_timeout; the worker leaves so the task's run ends with it.
RESTART_REASONS = ("crash", "recycle", "timeout", "consumer_timeout", "cancelled", "reload")

# Headers workqd writes on the copies it republishes; documented in workqd.yaml(5).
H_ATTEMPT = "x-workq-attempt"        # try number the message is for (1 = first)
H_DEFERRALS = "x-workq-deferrals"    # times a handler deferred it (RetryLater) so far
H_REASON = "x-workq-reason"          # one of DEAD_LETTER_REASONS
H_ERROR = "x-workq-error"            # last error line of the handler
H_DEAD_AT = "x-workq-dead-at"        # UTC time of dead-lettering, ISO 8601
H_QUEUE = "x-workq-queue"            # queue the task was consumed from
H_DELIVERY_COUNT = "x-delivery-count"  # the broker's, on quorum queues
H_SUBMITTED_MS = "x-workq-submitted-ms"  # workq-submit's publish time, ms since the epoch
H_EXPIRES_MS = "x-workq-expires-ms"  # a task delivered after this (ms since the epoch) is not run

# A header value longer than this is cut, so one copy cannot grow without bound.
MAX_ERROR_TEXT = 500


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dead"


def delay_queue(queue: str, delay: float) -> str:
    """A per-queue delay queue of workqd before the shared delay levels (delays.py): no
    longer declared or published to; named so configs cannot take these names."""
    return f"{queue}.delay.{delay:g}s"
