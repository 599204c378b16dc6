"""A progress line for long submissions: confirmed / total, rate, time left.

Written on a terminal only, over itself (carriage return), and cleared at the end;
in a pipe or a log nothing is written, so scripts see the same output as before.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


REFRESH = 0.2   # seconds between two redraws


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self.total = total
        self.clock = clock
        self.started = clock()
        self.shown = False
        self._last = self.started
        try:
            self.enabled = total > 1 and self.stream.isatty()
        except (AttributeError, ValueError):   # a closed or odd stream: stay quiet
            self.enabled = False

    def line(self, done: int) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = done / elapsed
        left = f"{(self.total - done) / rate:.0f}s left" if done and rate else "-"
        return f"workq-submit: {done}/{self.total} confirmed, {rate:.0f}/s, {left}"

    def update(self, done: int) -> None:
        """Show at most five times a second (called on every batch of confirms)."""
        if self.enabled and self.clock() - self._last >= REFRESH:
            self.show(done)

    def show(self, done: int) -> None:
        if self.enabled:
            self._last = self.clock()
            self.stream.write("\r\x1b[K" + self.line(done))
            self.stream.flush()
            self.shown = True

    def close(self) -> None:
        """Clear the line, so what follows starts at the left margin."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
