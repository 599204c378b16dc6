"""What a delivery's clock says before it runs: expired, not due yet, or on time.

A task carries its deadline (``x-workq-expires-ms``) and, when it came through the
delay levels, when it was due (``x-workq-due-ms``), both in milliseconds since the
epoch written by the publisher's clock. Pure: the worker's intake asks, and acts.
"""

from __future__ import annotations

from typing import NamedTuple

from .. import delays, vocab

# A delivery due later than this is sent through the levels again instead of run.
# Above the levels' own rounding (they count whole seconds, rounded up), so a task
# that arrives a little before its due time by a clock difference is not sent round.
EARLY_SLACK_MS = 1500

ON_TIME, EXPIRED, EARLY = "on_time", "expired", "early"


class Verdict(NamedTuple):
    kind: str
    seconds_left: float = 0.0   # EARLY: how long it still has to wait
    due_ms: int = 0             # EARLY: when it is due


def _millis(value) -> int | None:
    """A header written as a whole number of ms; anything else a publisher wrote is
    not ours to act on."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value < 2 ** 63 else None


def judge(headers: dict | None, now_ms: int) -> Verdict:
    if not headers:
        return Verdict(ON_TIME)
    expires = _millis(headers.get(vocab.H_EXPIRES_MS))
    if expires is not None and now_ms > expires:
        return Verdict(EXPIRED)
    due = _millis(headers.get(delays.H_DUE_MS))
    if due is not None and due - now_ms > EARLY_SLACK_MS:
        return Verdict(EARLY, (due - now_ms) / 1000, due)
    return Verdict(ON_TIME)
