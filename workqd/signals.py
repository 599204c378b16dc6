"""The master's signal queue: handlers only enqueue, the main loop does the work.

CPython's C-level handler writes each signal number to the wakeup pipe; the
Python-level handler does nothing at all (no logging, no kill: gunicorn #3198
was a deadlock from logging inside a handler). ``wait`` blocks on that pipe and
on the workers' wake pipe, with a deadline.
"""

from __future__ import annotations

import os
import select
import signal

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT)


class SignalQueue:
    def __init__(self) -> None:
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Workers write a byte here when their state changes in a way the master
        # acts on (started consuming, lost the broker, draining).
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._sig_r, select.POLLIN)
        self._poll.register(self.wake_r, select.POLLIN)

    def install(self) -> None:
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, _enqueue_only)

    def wait(self, timeout: float) -> list[int]:
        """Signals received, in order; returns early on a signal or a worker's wake byte."""
        self._poll.poll(max(0, int(timeout * 1000)))
        signals = list(_drain(self._sig_r))
        _drain(self.wake_r)
        return signals

    def close_in_child(self) -> None:
        """A forked worker drops the master's pipes and its handlers."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        for fd in (self._sig_r, self._sig_w, self.wake_r):
            os.close(fd)


def _enqueue_only(signum, frame) -> None:
    """Deliberately empty: the number is already in the wakeup pipe."""


def _drain(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)
