"""workqd: a supervised RabbitMQ work-queue daemon."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from workqd import Reject`` in a handler, without making every ``import workqd``
    # (workq-submit, the CLI) load the runner.
    if name in ("Reject", "RetryLater"):
        from . import runner
        return getattr(runner, name)
    raise AttributeError(f"module 'workqd' has no attribute {name!r}")
