"""sd_notify from the master: READY, STATUS, WATCHDOG, RELOADING, STOPPING, EXTEND_TIMEOUT_USEC.

Harmless without systemd: with no NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import os
import time

import sdnotify

STATUS_INTERVAL = 1.0  # seconds between STATUS updates at most
# While draining, ask systemd every EXTEND_EVERY seconds for EXTEND_BY more, so a
# shutdown_timeout above the unit's TimeoutStopSec= is honoured; a master that
# hangs stops asking and is killed EXTEND_BY seconds later (systemd >= 236).
EXTEND_EVERY, EXTEND_BY = 5.0, 15.0


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sd = sdnotify.SystemdNotifier() if self.enabled else None
        usec = os.environ.get("WATCHDOG_USEC", "")
        wd_pid = os.environ.get("WATCHDOG_PID", "")
        ours = not wd_pid or wd_pid == str(os.getpid())
        # Ping at half the interval systemd gave us, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and ours else 0.0
        self._last_watchdog = 0.0
        self._last_status = ""
        self._last_status_at = 0.0
        self._status_checked = float("-inf")
        self._last_extend = 0.0

    def _send(self, text: str) -> None:
        if self._sd is not None:
            self._sd.notify(text)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")
        self._last_status = status

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 match this to its reload job.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")

    def wants_report(self, now: float) -> bool:
        """Whether ``watchdog`` or ``status`` would do anything now: the master builds
        their status text and health (a look at every worker) only then, not every turn."""
        if self._sd is None:
            return False
        if self.watchdog_interval and \
                time.monotonic() - self._last_watchdog >= self.watchdog_interval:
            return True
        return now - self._status_checked >= STATUS_INTERVAL

    def status(self, text: str, now: float) -> None:
        self._status_checked = now
        if text != self._last_status and now - self._last_status_at >= STATUS_INTERVAL:
            self._send(f"STATUS={text}")
            self._last_status, self._last_status_at = text, now

    def watchdog(self) -> None:
        """Called by the master loop only while it and its pools are healthy."""
        now = time.monotonic()
        if self.watchdog_interval and now - self._last_watchdog >= self.watchdog_interval:
            self._send("WATCHDOG=1")
            self._last_watchdog = now

    def extend_timeout(self, now: float) -> None:
        """Called by the master loop while it drains workers on stop."""
        if now - self._last_extend >= EXTEND_EVERY:
            self._send(f"EXTEND_TIMEOUT_USEC={int(EXTEND_BY * 1e6)}")
            self._last_extend = now
