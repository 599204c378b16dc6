"""The one way the tests wait: poll with a deadline, never sleep blindly."""

from __future__ import annotations

import os
import time

# Every deadline is stretched by this factor. A deadline only costs time when a test
# fails, and the suite shares two cores with containers and brokers: a wait sized for a
# quiet machine ran out under load while the condition was on its way.
SCALE = float(os.environ.get("WORKQ_TEST_WAIT_SCALE", "2"))


def wait_for(predicate, timeout: float, interval: float = 0.05, what="condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds.
    ``what`` names the wait; a callable is called only then, so the text it returns (a
    daemon's log) is the one at the deadline, not at the start of the wait."""
    deadline = time.monotonic() + timeout * SCALE
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout * SCALE:g}s waiting for "
                                 f"{what() if callable(what) else what}")
        time.sleep(interval)
