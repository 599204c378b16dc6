"""The one way the tests wait: poll with a deadline, never sleep blindly."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float, interval: float = 0.05, what="condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds.
    ``what`` names the wait; a callable is called only then, so the text it returns (a
    daemon's log) is the one at the deadline, not at the start of the wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for "
                                 f"{what() if callable(what) else what}")
        time.sleep(interval)
