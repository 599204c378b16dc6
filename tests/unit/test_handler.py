"""The worker's handler thread (workqd.worker.handler) against a real slot, no broker."""

from __future__ import annotations

import threading
import time
import types

import pika

from workqd import exitcodes, vocab
from workqd.runner import Task
from workqd.slots import SlotTable
from workqd.worker.handler import HandlerThread
from workqd.worker.intake import Delivery


def test_a_recycling_worker_never_shows_as_leaving_while_its_last_task_waits_to_begin():
    # A CI run once caught the master's gauges in that window: the I/O thread
    # had raised draining, the handler thread had not yet begun the task, so the worker
    # counted as neither idle nor busy and the pool looked one short.
    slot = SlotTable(capacity=1).allocate(1)
    slot.subscribed()
    seen = []
    leaving = []
    release = threading.Event()

    def run(body, task):
        seen.append((task.message_id, slot.busy, slot.draining, len(leaving)))
        release.wait(5)

    handler = HandlerThread(run, slot, 5.0, lambda: leaving.append(True))
    settler = types.SimpleNamespace(direct_ack=False)
    first = Delivery(settler, 1, b"", pika.BasicProperties(), Task("m1", "q", {}, False, 0, 1))
    last = Delivery(settler, 2, b"", pika.BasicProperties(), Task("m2", "q", {}, False, 0, 1))
    handler.last = last
    handler.submit(first)
    handler.submit(last)
    assert not slot.draining          # queued, not begun: the worker is still capacity
    handler.start()
    release.set()
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [("m1", True, False, 0), ("m2", True, True, 1)]


def _run_one(run, slot=None, monkeypatch=None) -> tuple[HandlerThread, Delivery, list]:
    """Run one task through a started handler thread; wait until it is back or gone."""
    slot = slot or SlotTable(capacity=1).allocate(1)
    exits: list[int] = []
    if monkeypatch is not None:
        # The thread's last resort ends the process; here it records and ends the thread.
        monkeypatch.setattr("workqd.worker.handler.os._exit", exits.append)
    handler = HandlerThread(run, slot, 5.0)
    d = Delivery(types.SimpleNamespace(direct_ack=False), 1, b"", pika.BasicProperties(),
                 Task("m1", "q", {}, False, 0, 1))
    handler.submit(d)
    handler.start()
    deadline = time.monotonic() + 5
    while not handler.results and not exits and time.monotonic() < deadline:
        time.sleep(0.01)
    return handler, d, exits


def test_a_handler_that_calls_sys_exit_fails_its_task_and_the_thread_goes_on():
    import sys

    def run(body, task):
        sys.exit(3)

    handler, d, _ = _run_one(run)
    assert list(handler.results) == [d]
    assert (d.outcome, d.failure) == (vocab.RETRY, "SystemExit: 3")
    assert handler._thread.is_alive()     # ready for the next task


def test_a_fault_in_workqd_on_the_handler_thread_ends_the_worker_at_once(monkeypatch):
    # Without the last resort the thread would end and its task wait for the timeout,
    # settled by nobody before it. Here the slot (workqd's code, not the handler) fails.
    ran = []

    def broken_begin(*args):
        raise RuntimeError("a bug in workqd")

    slot = types.SimpleNamespace(begin=broken_begin)
    handler, d, exits = _run_one(lambda body, task: ran.append(task), slot, monkeypatch)
    assert exits == [exitcodes.WORKER_CRASH] and not ran and not handler.results
