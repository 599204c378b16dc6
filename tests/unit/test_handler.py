"""The worker's handler thread (workqd.worker.handler) against a real slot, no broker."""

from __future__ import annotations

import threading
import time
import types

import pika

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
