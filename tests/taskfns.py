"""Handlers for the tests, with a ledger of every execution.

The body is a list of ``key=value`` words: ``n=7 sleep=0.4 fail=1 die=1 leak=20
gate=/path``. A gate holds the task until that file exists (two minutes at most), so
a test can keep it running until what it waits for has happened, not for a guess.
Every run appends ``start`` and ``end`` lines to the file named by
WORKQ_TEST_LEDGER (O_APPEND writes of one line are atomic), so a test can tell
exactly who ran what, how often, and whether it completed.
"""

import json
import os
import signal
import time

_LEAK = []


def _ledger(event: str, task, **extra) -> None:
    path = os.environ.get("WORKQ_TEST_LEDGER")
    if not path:
        return
    line = json.dumps({"event": event, "id": task.message_id, "pid": os.getpid(),
                       "redelivered": task.redelivered, "attempt": task.attempt,
                       "delivery_count": task.delivery_count, "t": time.time(), **extra})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def parse(body: bytes) -> dict:
    return dict(word.split("=", 1) for word in body.decode().split() if "=" in word)


def work(body: bytes, task) -> None:
    args = parse(body)
    _ledger("start", task, body=body.decode())
    if args.get("die"):
        # A poison task: takes its worker down the hard way, every time.
        os.kill(os.getpid(), signal.SIGKILL)
    if "leak" in args:
        _LEAK.append(bytearray(int(args["leak"]) << 20))
    time.sleep(float(args.get("sleep", 0)))
    if "gate" in args:
        _wait_gate(args["gate"], time.monotonic() + 120)
    if args.get("fail"):
        _ledger("fail", task)
        raise RuntimeError(f"task {args.get('n', '?')} failed on purpose")
    _ledger("end", task)


def _wait_gate(path: str, deadline: float) -> None:
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"gate {path} never opened")
        time.sleep(0.01)


def broken_import():
    raise AssertionError("never called")


raise_on_import = os.environ.get("WORKQ_TEST_BROKEN_IMPORT")
if raise_on_import:
    raise ImportError("this handler module is broken on purpose")


def reject(body: bytes, task) -> None:
    """Says no retry can help this task."""
    from workqd import Reject
    _ledger("start", task, body=body.decode())
    raise Reject(f"cannot use {body[:20]!r}")


def later(body: bytes, task) -> None:
    """Cannot attempt any task now (a service it needs is down, say)."""
    from workqd import RetryLater
    _ledger("start", task, body=body.decode(), deferrals=task.headers.get("x-workq-deferrals", 0))
    raise RetryLater("the database is down")


def deadline(body: bytes, task) -> None:
    """Records how long it has until its deadline."""
    _ledger("start", task, left=task.deadline - time.monotonic())


def exits(body: bytes, task) -> None:
    """A handler written as a script: ends with sys.exit, as scripts do."""
    import sys
    _ledger("start", task)
    sys.exit(int(parse(body).get("status", 1)))
