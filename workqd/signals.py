"""The master's signal queue: handlers only enqueue, the main loop does the work.

CPython's C-level handler writes each signal number to the wakeup pipe; the
Python-level handler does nothing at all (no logging, no kill: gunicorn #3198
was a deadlock from logging inside a handler). The master's loop reads the
pipe when its selector says so.

Every catchable signal whose default would kill the master (USR1, USR2, ALRM,
the real-time signals, ...) gets the same empty handler, so a stray
``kill -USR1`` is logged and ignored instead of ending the daemon. Handlers,
unlike SIG_IGN, are reset by exec, so command handlers start with defaults.
"""

from __future__ import annotations

import os
import signal

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT)
# Left alone: faults (a real crash must still crash), job control, the two that
# cannot be caught, and PIPE and XFSZ, which Python already ignores (a write to a
# closed socket must fail with EPIPE, in every process).
_UNTOUCHED = {signal.SIGPIPE, signal.SIGXFSZ, signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT, signal.SIGTSTP, signal.SIGSEGV,
              signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGSYS,
              signal.SIGTRAP, signal.SIGWINCH, signal.SIGURG}
IGNORED = tuple(sorted(set(signal.valid_signals()) - set(HANDLED) - _UNTOUCHED))


class SignalQueue:
    def __init__(self) -> None:
        self.read_fd, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Workers write a byte here when their state changes in a way the master
        # acts on (started consuming, lost the broker, draining).
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self) -> None:
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        for sig in (*HANDLED, *IGNORED):
            signal.signal(sig, _enqueue_only)

    def received(self) -> list[int]:
        """Signals received since the last call, in order."""
        return list(_drain(self.read_fd))

    def clear_wakes(self) -> None:
        _drain(self.wake_r)

    def close_in_child(self) -> None:
        """A forked child drops the master's pipes and handlers."""
        signal.set_wakeup_fd(-1)
        for sig in (*HANDLED, *IGNORED):
            signal.signal(sig, signal.SIG_DFL)
        for fd in (self.read_fd, self._sig_w, self.wake_r):
            os.close(fd)


def signame(sig: int) -> str:
    """A name for any signal number, for log lines: "SIGTERM", "SIGRTMIN+1", "signal 99".

    ``signal.Signals`` has no members for the real-time signals (``systemctl kill
    -s SIGRTMIN+1`` sends one), so looking a number up there can raise."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        pass
    if signal.SIGRTMIN <= sig <= signal.SIGRTMAX:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"
    return f"signal {sig}"


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
