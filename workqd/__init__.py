"""workqd: a supervised RabbitMQ work-queue daemon."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from workqd import Reject`` in a handler, without making every ``import workqd``
    # (workq-submit, the CLI, the master) load the handler API.
    if name in ("Reject", "RetryLater", "Task"):
        from . import task
        return getattr(task, name)
    raise AttributeError(f"module 'workqd' has no attribute {name!r}")
