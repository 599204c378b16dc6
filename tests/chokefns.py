"""A handler module that makes intake choke on one header, for tests/integration/test_frames.py.

Imported by the worker when it loads its handler, before it consumes: from then
on ``read_task`` raises on a message with header ``x-test-choke``, as it would on
a header value no one foresaw. The worker must dead-letter that message as
malformed and keep consuming.
"""

from taskfns import work  # noqa: F401  (the handler itself)
from workqd.worker import intake

_read_task = intake.read_task


def _choking_read_task(queue, redelivered, props, body, *args, **kwargs):
    if "x-test-choke" in (props.headers or {}):
        raise ValueError("a header value intake did not foresee")
    return _read_task(queue, redelivered, props, body, *args, **kwargs)


intake.read_task = _choking_read_task
