"""Running one task through the configured handler, in the worker's handler thread."""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Callable

from .config import Handler

log = logging.getLogger("workqd.worker")

# Lines of handler output kept in the log per stream and task; the rest is counted.
MAX_LOGGED_LINES = 200
PR_SET_PDEATHSIG = 1


@dataclass(slots=True)
class Task:
    """What a handler learns about the message it runs."""
    message_id: str
    queue: str
    headers: dict = field(default_factory=dict)
    redelivered: bool = False
    delivery_count: int = 0   # earlier deliveries (quorum x-delivery-count), 0 on the first
    attempt: int = 1          # try number across retries (x-workq-attempt)


class HandlerFailed(Exception):
    """The handler reported failure; ``args[0]`` is the one-line reason."""


class HandlerTimedOut(Exception):
    """The handler ran past the queue's timeout and was killed."""


class BootError(Exception):
    """The handler cannot be loaded at all."""


def load(handler: Handler, timeout: float) -> Callable[[bytes, Task], None]:
    """A callable ``run(body, task)`` that returns on success and raises on failure."""
    if handler.command:
        return _CommandRunner(handler.command, timeout)
    module_name, _, func_name = handler.python.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in func_name.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # any import-time error of user code is a boot error
        raise BootError(f"cannot load handler {handler.python}: {type(e).__name__}: {e}") from None
    if not callable(obj):
        raise BootError(f"handler {handler.python} is not callable")
    return obj


def _libc_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


class _CommandRunner:
    """Runs argv without a shell: body on stdin, metadata in WORKQ_* variables."""

    def __init__(self, argv: tuple[str, ...], timeout: float):
        self.argv = list(argv)
        self.timeout = timeout
        # Resolved before any fork; calling it in the child only makes a syscall.
        self._prctl = _libc_prctl()
        self._parent = os.getpid()

    def _in_child(self) -> None:
        # The handler's process dies with its worker, even on SIGKILL of the worker.
        if self._prctl is not None:
            self._prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self._parent:  # the worker died before prctl took effect
            os._exit(1)

    def __call__(self, body: bytes, task: Task) -> None:
        env = dict(os.environ)
        env.update(WORKQ_MESSAGE_ID=task.message_id, WORKQ_QUEUE=task.queue,
                   WORKQ_REDELIVERED="1" if task.redelivered else "0",
                   WORKQ_DELIVERY_COUNT=str(task.delivery_count),
                   WORKQ_ATTEMPT=str(task.attempt))
        self._parent = os.getpid()
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, close_fds=True,
                                    start_new_session=True, preexec_fn=self._in_child)
        except OSError as e:
            raise HandlerFailed(f"cannot run {self.argv[0]}: {e.strerror}") from None
        try:
            out, err = proc.communicate(body, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            # Kill the whole process group: the handler may have children of its own.
            _kill_group(proc.pid)
            out, err = proc.communicate()
            _log_output(task.message_id, out, err)
            raise HandlerTimedOut(f"{self.argv[0]} ran past {self.timeout:g}s and was killed") from None
        finally:
            if proc.poll() is None:
                _kill_group(proc.pid)
                proc.wait()
        _log_output(task.message_id, out, err)
        if proc.returncode != 0:
            how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                   else f"exit status {proc.returncode}")
            last = (err or out).strip().splitlines()[-1:] or [b""]
            detail = last[0].decode("utf-8", "replace")[:300]
            raise HandlerFailed(f"{self.argv[0]}: {how}" + (f": {detail}" if detail else ""))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _log_output(message_id: str, out: bytes, err: bytes) -> None:
    for name, data, level in (("stdout", out, logging.INFO), ("stderr", err, logging.WARNING)):
        if not data:
            continue
        lines = data.decode("utf-8", "replace").splitlines()
        for line in lines[:MAX_LOGGED_LINES]:
            log.log(level, "task %s %s: %s", message_id, name, line)
        if len(lines) > MAX_LOGGED_LINES:
            log.log(level, "task %s %s: (%d more lines not logged)", message_id, name,
                    len(lines) - MAX_LOGGED_LINES)
