"""Handlers shipped with workqd."""

import time


def sleep_dots(body: bytes, task) -> None:
    """The RabbitMQ tutorial's task: sleep one second per '.' in the body."""
    time.sleep(body.count(b"."))


def noop(body: bytes, task) -> None:
    """Does nothing; for benchmarks of the daemon's own overhead."""
