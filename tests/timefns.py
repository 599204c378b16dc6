"""Handlers for the clock tests (tests/integration/test_time_worker.py), writing to the same ledger
as tests/taskfns.py."""

from taskfns import _ledger, parse


def flaky(body: bytes, task) -> None:
    """Fails every try before ``until=N``, then succeeds."""
    _ledger("start", task)
    if task.attempt < int(parse(body).get("until", 1)):
        raise RuntimeError(f"try {task.attempt} fails on purpose")
    _ledger("end", task)


def due(body: bytes, task) -> None:
    """Records when the task said it was due (x-workq-due-ms), to compare with its start."""
    _ledger("start", task, due_ms=task.headers.get("x-workq-due-ms"))


def back_in(body: bytes, task) -> None:
    """Asks to come back in ``delay=S`` seconds the first time, succeeds the second."""
    from workqd import RetryLater
    _ledger("start", task, deferrals=task.headers.get("x-workq-deferrals", 0))
    if not task.headers.get("x-workq-deferrals"):
        raise RetryLater("the partner's API opens later", delay=float(parse(body)["delay"]))
    _ledger("end", task)
