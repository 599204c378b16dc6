"""Running one task through the configured handler, in the worker's handler thread."""

from __future__ import annotations

import datetime
import importlib
import json
import logging
import os
import selectors
import shutil
import signal
import site
import subprocess
import sys
import time
from typing import Callable

from . import vocab
from .task import Reject, RetryLater, Task
from .config import HIDDEN_VARIABLES, Handler, Invalid, virtualenv_site_packages

log = logging.getLogger("workqd.worker")

# Lines of handler output kept in the log per stream and task; the rest is counted.
MAX_LOGGED_LINES = 200
# A command's output is read as it comes and mostly thrown away: a handler
# writing gigabytes must not make its worker hold them. Per stream and task the
# worker keeps the first MAX_KEPT_OUTPUT bytes (what is logged) and the last
# TAIL_BYTES (the last line names the failure); the rest is only counted.
MAX_KEPT_OUTPUT = 64 << 10
TAIL_BYTES = 4 << 10
MAX_LOGGED_LINE = 2000    # characters of one logged line; longer ones are cut
# After SIGKILL of the handler's group: how long its pipes may stay open (a
# child that left the group holds them) before the worker stops reading.
KILLED_DRAIN = 5.0
# util-linux's setpriv sets the parent-death signal and then execs the handler.
# Doing that in a preexec_fn is unsafe in a process with threads (the worker has
# its handler thread), which Python's documentation warns about.
SETPRIV = "/usr/bin/setpriv"


class HandlerRejected(Reject):
    """A command handler exited with vocab.EXIT_REJECT (65, EX_DATAERR)."""


class HandlerDeferred(RetryLater):
    """A command handler exited with vocab.EXIT_RETRY_LATER (75, EX_TEMPFAIL)."""


class HandlerFailed(Exception):
    """The handler reported failure; ``args[0]`` is the one-line reason."""


class HandlerTimedOut(Exception):
    """The handler ran past the queue's timeout and was killed."""


class HandlerCancelled(Exception):
    """The task was cancelled while its command ran, and the command was stopped."""


class _CancelAsked(Exception):
    """Inside _CommandRunner: the I/O thread asked to stop the running task."""


class BootError(Exception):
    """The handler cannot be loaded at all."""


def load(handler: Handler, timeout: float, grace: float = 5.0) -> Callable[[bytes, Task], None]:
    """A callable ``run(body, task)`` that returns on success and raises on failure.
    ``grace``: seconds a timed-out command gets between SIGTERM and SIGKILL."""
    if handler.command:
        return _CommandRunner(handler, timeout, grace)
    prepare_python(handler)
    module_name, _, func_name = handler.python.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in func_name.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # any import-time error of user code is a boot error
        raise BootError(f"cannot load handler {handler.python}: {type(e).__name__}: {e}") from None
    if not callable(obj):
        raise BootError(f"handler {handler.python} is not callable")
    return obj   # called as is: the handler thread sets task.deadline as the task starts


def handler_environment(handler: Handler) -> dict[str, str]:
    """The daemon's environment without what handlers must not see, plus the handler's own."""
    env = {k: v for k, v in os.environ.items() if k not in HIDDEN_VARIABLES}
    env.update(handler.environment)
    return env


def prepare_python(handler: Handler) -> None:
    """Make this worker process the Python handler's home before its module is imported:
    environment, working directory, python_path and the virtualenv's site-packages."""
    env = handler_environment(handler)
    os.environ.clear()
    os.environ.update(env)
    if handler.working_directory:
        try:
            os.chdir(handler.working_directory)
        except OSError as e:
            raise BootError(f"handler.working_directory {handler.working_directory}: "
                            f"{e.strerror}") from None
    before = list(sys.path)
    if handler.virtualenv:
        try:
            site_dir = virtualenv_site_packages(handler.virtualenv)
        except Invalid as e:   # changed since the config was checked
            raise BootError(f"handler.virtualenv: {e}") from None
        # addsitedir also runs the venv's .pth files (editable installs, namespace packages).
        site.addsitedir(site_dir)
    added = [p for p in sys.path if p not in before]
    # The handler's own directories and packages come before the daemon's, as they would
    # in its virtualenv's own interpreter.
    sys.path[:] = [*handler.python_path, *added,
                   *(p for p in before if p not in handler.python_path)]


def error_line(e: BaseException) -> str:
    """``Type: last line of the message``, at most 500 characters."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".rstrip(": ")[:500]


# Nesting kept in the metadata document's headers; deeper values are shown as text.
MAX_META_DEPTH = 32


def json_safe(value, depth: int = 0):
    """``value`` (a header as pika decoded it) as JSON can carry it: bytes as UTF-8 text
    (invalid sequences replaced), datetimes in ISO 8601, decimals and the rest as text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if depth >= MAX_META_DEPTH:
        return str(value)[:200]
    if isinstance(value, dict):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    return str(value)


def metadata(task: Task) -> bytes:
    """The JSON document a command reads on WORKQ_META_FD."""
    left = task.deadline - time.monotonic()
    wall = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=left)
    doc = {"message_id": task.message_id, "queue": task.queue,
           "exchange": task.exchange, "routing_key": task.routing_key,
           "redelivered": task.redelivered, "delivery_count": task.delivery_count,
           "attempt": task.attempt, "headers": json_safe(task.headers),
           "properties": json_safe(task.properties), "deadline": task.deadline,
           "deadline_utc": wall.isoformat(timespec="milliseconds")}
    # "replace": a lone surrogate in a header must not make the document unreadable.
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "replace")


def _meta_fd(task: Task) -> int:
    """A memfd holding the task's metadata, at offset 0 (a pipe could block on a big one)."""
    data = metadata(task)
    fd = os.memfd_create("workq-meta", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


class _CommandRunner:
    """Runs argv without a shell: body on stdin, metadata in WORKQ_* variables and as a
    JSON document on the file descriptor named in WORKQ_META_FD."""

    def __init__(self, handler: Handler, timeout: float, grace: float):
        self.argv = list(handler.command)
        self.handler = handler
        self.timeout = timeout
        self.grace = grace
        setpriv = SETPRIV if os.access(SETPRIV, os.X_OK) else shutil.which("setpriv")
        # The handler's process dies with its worker's handler thread (which lives
        # as long as the worker), even on SIGKILL of the worker.
        self._spawn = [setpriv, "--pdeathsig", "KILL", "--", *self.argv] if setpriv else self.argv
        # cancel(): the I/O thread names the task to stop, then wakes the handler thread,
        # which waits on this eventfd beside the command's pipes. A stop asked for a
        # task that has ended meanwhile names a task no longer running: ignored.
        self._cancel_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._cancel_for: Task | None = None

    def cancel(self, task: Task) -> None:
        """Any thread: stop ``task``'s command as a timeout would (TERM to its group,
        KILL after the grace); its run then raises HandlerCancelled."""
        self._cancel_for = task
        os.eventfd_write(self._cancel_fd, 1)

    def __call__(self, body: bytes, task: Task) -> None:
        env = handler_environment(self.handler)
        env.update(WORKQ_MESSAGE_ID=task.message_id, WORKQ_QUEUE=task.queue,
                   WORKQ_REDELIVERED="1" if task.redelivered else "0",
                   WORKQ_DELIVERY_COUNT=str(task.delivery_count),
                   WORKQ_ATTEMPT=str(task.attempt))
        if not os.access(self.argv[0], os.X_OK):
            raise HandlerFailed(f"cannot run {self.argv[0]}: not an executable file")
        try:
            meta = _meta_fd(task)
        except OSError as e:
            raise HandlerFailed(f"cannot write the metadata of the task: {e.strerror}") from None
        env["WORKQ_META_FD"] = str(meta)
        try:
            # start_new_session is a setsid() in the C child code, not a preexec_fn:
            # the handler gets its own process group, killed as a whole on timeout.
            proc = subprocess.Popen(self._spawn, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, close_fds=True,
                                    pass_fds=(meta,), cwd=self.handler.working_directory,
                                    start_new_session=True)
        except OSError as e:
            where = f" in {self.handler.working_directory}" if self.handler.working_directory else ""
            raise HandlerFailed(f"cannot run {self.argv[0]}{where}: {e.strerror}") from None
        finally:
            os.close(meta)
        output = _Output(proc, body, self._cancel_fd)
        deadline = time.monotonic() + self.timeout
        asked = lambda: self._cancel_for is task   # noqa: E731
        try:
            output.pump(deadline, asked)
            _wait(proc, deadline, asked)
        except subprocess.TimeoutExpired:
            how = self._stop(proc, output)
            _log_output(task.message_id, output)
            raise HandlerTimedOut(f"{self.argv[0]} ran past {self.timeout:g}s and {how}") from None
        except _CancelAsked:
            how = self._stop(proc, output)
            _log_output(task.message_id, output)
            raise HandlerCancelled(f"{self.argv[0]} cancelled while running and {how}") from None
        finally:
            if proc.poll() is None:
                _kill_group(proc.pid)
                proc.wait()
            output.close()
        _log_output(task.message_id, output)
        if proc.returncode != 0:
            how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                   else f"exit status {proc.returncode}")
            last = (output.err.last() or output.out.last()).strip().splitlines()[-1:] or [b""]
            detail = last[0].decode("utf-8", "replace")[:300]
            line = f"{self.argv[0]}: {how}" + (f": {detail}" if detail else "")
            if proc.returncode == vocab.EXIT_REJECT:
                raise HandlerRejected(line)
            if proc.returncode == vocab.EXIT_RETRY_LATER:
                raise HandlerDeferred(line)
            raise HandlerFailed(line)

    def _stop(self, proc: subprocess.Popen, output: "_Output") -> str:
        """SIGTERM to the whole process group (the handler may have children of its own),
        SIGKILL after the grace; returns how it ended."""
        how = "was killed"
        if self.grace > 0:
            _kill_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            try:
                output.pump(deadline)
                proc.wait(max(0.0, deadline - time.monotonic()))
                how = f"stopped on SIGTERM within its grace of {self.grace:g}s"
            except subprocess.TimeoutExpired:
                how = f"was killed after a grace of {self.grace:g}s"
            else:
                _kill_group(proc.pid)   # whatever it left behind in its group
                return how
        _kill_group(proc.pid)
        try:
            output.pump(time.monotonic() + KILLED_DRAIN)
        except subprocess.TimeoutExpired:
            log.warning("%s: its pipes stayed open %gs after SIGKILL (a child outside its "
                        "process group?); not read further", self.argv[0], KILLED_DRAIN)
        proc.wait()
        return how


class _Stream:
    """What a command wrote to one pipe: the head (logged) and the tail (its last line)."""

    def __init__(self):
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0       # bytes beyond the head (the tail is among them)

    def add(self, data: bytes) -> None:
        room = MAX_KEPT_OUTPUT - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.dropped += len(data)
            self.tail += data
            del self.tail[:-TAIL_BYTES]

    def last(self) -> bytes:
        """The end of the output, where its last line is."""
        return bytes(self.tail if self.dropped else self.head)


def _wait(proc: subprocess.Popen, deadline: float, asked: Callable[[], bool]) -> None:
    """proc.wait until ``deadline`` (subprocess.TimeoutExpired), looking every
    CANCEL_LOOK seconds whether a stop was asked (_CancelAsked): a command that
    closed its output but runs on is stopped by a cancel too."""
    while True:
        left = deadline - time.monotonic()
        try:
            proc.wait(max(0.0, min(left, CANCEL_LOOK)))
            return
        except subprocess.TimeoutExpired:
            if left <= CANCEL_LOOK:
                raise
            if asked():
                raise _CancelAsked() from None


CANCEL_LOOK = 0.1   # seconds between looks at a cancel while a command's output is closed


class _Output:
    """Feeds the body to a command's stdin and reads its stdout and stderr, in the
    handler thread, as subprocess.communicate does but keeping only _Stream's share.
    ``cancel_fd`` wakes ``pump`` when the I/O thread asks for a stop."""

    def __init__(self, proc: subprocess.Popen, body: bytes, cancel_fd: int = -1):
        self.out, self.err = _Stream(), _Stream()
        self._body = memoryview(body)
        self._sel = selectors.DefaultSelector()
        self._files = [proc.stdin, proc.stdout, proc.stderr]
        self._cancel_fd = cancel_fd
        self._pipes = 2 + bool(body)   # registrations that end the pump when all are gone
        if body:
            os.set_blocking(proc.stdin.fileno(), False)
            self._sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        self._sel.register(proc.stdout, selectors.EVENT_READ, self.out)
        self._sel.register(proc.stderr, selectors.EVENT_READ, self.err)
        if cancel_fd >= 0:
            self._sel.register(cancel_fd, selectors.EVENT_READ, _CancelAsked)

    def pump(self, deadline: float, asked: Callable[[], bool] | None = None) -> None:
        """Until both output pipes are at EOF; subprocess.TimeoutExpired at ``deadline``;
        _CancelAsked when ``asked`` says this run is to stop (None: not now, the
        command is being stopped already)."""
        while self._pipes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired("handler", 0)
            for key, _ in self._sel.select(left):
                if key.data is _CancelAsked:
                    try:
                        os.eventfd_read(self._cancel_fd)
                    except BlockingIOError:
                        pass
                    if asked is not None and asked():
                        raise _CancelAsked()
                elif key.data is None:
                    self._write(key.fileobj)
                else:
                    self._read(key.fileobj, key.data)

    def _write(self, f) -> None:
        try:
            sent = os.write(f.fileno(), self._body[:1 << 16])
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError):
            sent = len(self._body)     # the command stopped reading: the rest is not wanted
        self._body = self._body[sent:]
        if not self._body:
            self._sel.unregister(f)
            self._pipes -= 1
            f.close()

    def _read(self, f, stream: _Stream) -> None:
        data = os.read(f.fileno(), 1 << 16)
        if data:
            stream.add(data)
        else:
            self._sel.unregister(f)
            self._pipes -= 1

    def close(self) -> None:
        self._sel.close()
        for f in self._files:
            try:
                f.close()
            except OSError:
                pass


def _kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _log_output(message_id: str, output: _Output) -> None:
    for name, stream, level in (("stdout", output.out, logging.INFO),
                                ("stderr", output.err, logging.WARNING)):
        if not stream.head:
            continue
        lines = stream.head.decode("utf-8", "replace").splitlines()
        for line in lines[:MAX_LOGGED_LINES]:
            if len(line) > MAX_LOGGED_LINE:
                line = f"{line[:MAX_LOGGED_LINE]}... ({len(line) - MAX_LOGGED_LINE} more characters)"
            log.log(level, "task %s %s: %s", message_id, name, line)
        if len(lines) > MAX_LOGGED_LINES:
            log.log(level, "task %s %s: (%d more lines not logged)", message_id, name,
                    len(lines) - MAX_LOGGED_LINES)
        if stream.dropped:
            log.log(level, "task %s %s: ... %d more bytes dropped", message_id, name,
                    stream.dropped)
