"""Task functions shared by every system under test (plain pika, workqd, Celery, Dramatiq).

``stamp`` is the W1 no-op: it counts its calls and keeps the monotonic time of
the first and the last one in a 24-byte file per process under
$BENCH_STAMP_DIR (a tmpfs), written through mmap. The bench reads those files to
know when a drain finished and how long it took, without asking the system
under test anything (no /metrics scrape, no queue polling while it runs). It
costs a few hundred nanoseconds a call, the same in every system.

``cpu_1ms`` and ``io_5ms`` (W5) do a millisecond of CPU or wait five on I/O,
then stamp. ``sleep_ms`` (W2) and ``recover`` (W3) append one line per start and end to
$BENCH_LOG with O_APPEND, which is atomic for lines this short.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time

_view_q = None   # the stamp file as int64 words: [count, first, last]
_view_d = None   # the same memory as doubles


def _reset_after_fork() -> None:
    global _view_q, _view_d
    _view_q = _view_d = None


os.register_at_fork(after_in_child=_reset_after_fork)


def _open_stamp():
    global _view_q, _view_d
    path = os.path.join(os.environ["BENCH_STAMP_DIR"], str(os.getpid()))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 24)
        mm = mmap.mmap(fd, 24)
    finally:
        os.close(fd)
    _view_q = memoryview(mm).cast("q")
    _view_d = memoryview(mm).cast("d")
    return _view_q


def stamp(body: bytes, task=None) -> None:
    """No-op task that leaves a trace: call count, first and last call time."""
    q = _view_q
    if q is None:
        q = _open_stamp()
    d = _view_d
    now = time.monotonic()
    if q[0] == 0:
        d[1] = now
    d[2] = now
    q[0] += 1


# W5: tasks that do something, so that a system's own cost per task is seen beside
# a task's (the no-op W1 shows only that cost).
CPU_SECONDS = 0.001
IO_SECONDS = 0.005


def cpu_1ms(body: bytes, task=None) -> None:
    """One millisecond of this thread's CPU (whatever else runs on the machine), then stamp."""
    end = time.thread_time() + CPU_SECONDS
    x = 0
    while time.thread_time() < end:
        for i in range(200):
            x += i * i
    stamp(body, task)


def io_5ms(body: bytes, task=None) -> None:
    """Five milliseconds waiting on I/O (a sleep: the process yields its core), then stamp."""
    time.sleep(IO_SECONDS)
    stamp(body, task)


def read_stamps(directory: str) -> list[tuple[int, int, float, float]]:
    """(pid, count, first, last) of every process that ran ``stamp`` under ``directory``."""
    out = []
    for name in os.listdir(directory):
        try:
            with open(os.path.join(directory, name), "rb") as f:
                raw = f.read(24)
        except OSError:
            continue
        if len(raw) == 24:
            count, first, last = struct.unpack("qdd", raw)
            out.append((int(name), count, first, last))
    return out


def _log(event: str, task_id: str, redelivered: bool, **extra) -> None:
    line = json.dumps({"e": event, "id": task_id, "pid": os.getpid(), "t": time.monotonic(),
                       "r": redelivered, **extra}) + "\n"
    fd = os.open(os.environ["BENCH_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _task_id(body: bytes) -> str:
    return body.split(b" ", 1)[0].decode()


def sleep_ms(body: bytes, task=None) -> None:
    """W2: body ``<id> <milliseconds>``; sleeps that long between a start and an end line."""
    ms = float(body.split()[1])
    tid = _task_id(body)
    _log("start", tid, bool(task and task.redelivered))
    time.sleep(ms / 1000.0)
    _log("end", tid, bool(task and task.redelivered))


def recover(body: bytes, task=None) -> None:
    """W3: body ``<id> <seconds>``; a redelivered task sleeps only a little (it was cut once)."""
    seconds = float(body.split()[1])
    redelivered = bool(task and task.redelivered)
    tid = _task_id(body)
    _log("start", tid, redelivered)
    time.sleep(0.02 if redelivered else seconds)
    _log("end", tid, redelivered)
