"""The worker (workqd.worker.Worker) with fakes: its tick against a task that just began,
a Python handler's timeout, and the delivery callback pika calls. No broker and no real
worker processes; a few milliseconds each."""

from __future__ import annotations

import collections
import os
import threading
import time
import types

import pika
from polling import wait_for

from workqd import config, exitcodes, vocab
from workqd.runner import Task
from workqd.slots import SlotTable
from workqd.worker import Worker
from workqd.worker import intake
from workqd.worker.handler import HandlerThread
from workqd.worker.intake import Delivery

CFG = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}, "timeout": 5,
                                "retry": {"attempts": 1}}]}, "t.yaml")
QUEUE = CFG.queues[0]

# --- a task's start is published with it: a tick in between must not time it out ---

class _Slot:
    """A slot whose begin() runs a hook, standing in for the I/O thread's tick."""

    def __init__(self, hook):
        self.hook = hook

    def begin(self, mid, redelivered, started, wait=None):
        self.hook()

    def end(self):
        pass


def _worker():
    slots = SlotTable(capacity=2)
    r, w = os.pipe()
    worker = Worker(1, QUEUE, CFG.broker, slots.allocate(1), w, "info")
    worker.pid = os.getpid()
    worker._master_pid = os.getppid()
    worker._publisher = types.SimpleNamespace(idle=True, close=lambda: None)
    return worker


class _Settler:
    usable = True
    pending = False
    direct_ack = False

    def __init__(self):
        self.copies, self.acks = [], []

    def publish_copy(self, d, s):
        self.copies.append((d.tag, s))
        return True

    def ack(self, d):
        self.acks.append(d.tag)
        return True

    def abandon(self, d):
        d.abandoned = True
        return True

    def reply(self, *a):
        pass

    def requeue(self, d):
        pass

    def flush(self):
        pass


def test_tick_in_the_start_window_never_times_out_a_task_that_just_began():
    worker = _worker()
    seen = []
    release = threading.Event()

    def run(body, task):
        seen.append(("in handler", worker._handler.running))
        release.wait(5)

    def tick_now():   # the I/O thread's tick, at the worst moment
        seen.append(("at begin", worker._handler.running))
        worker._check()

    worker._handler = HandlerThread(run, _Slot(tick_now), 5.0)
    worker._ioloop = types.SimpleNamespace(stop=lambda: None)
    settler = _Settler()
    d = Delivery(settler, 1, b"", pika.BasicProperties(), Task("m1", "q", {}, False, 0, 1))
    worker._handler.start()
    worker._handler.submit(d)
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker._check()
    release.set()
    assert seen[0] == ("at begin", None)
    assert seen[1][1] is d and d.started > 0
    assert settler.copies == [] and not d.abandoned and not worker._stopping


def test_python_timeout_settles_once_and_ignores_the_late_result():
    worker = _worker()
    settler = _Settler()
    d = Delivery(settler, 9, b"", pika.BasicProperties(), Task("m9", "q", {}, False, 0, 1))
    d.started = time.monotonic() - 60
    handler = types.SimpleNamespace(running=d, results=collections.deque(), wake_always=True,
                                    take_unstarted=lambda: [], busy=lambda: False, idle=lambda: True)
    worker._handler = handler
    stopped = []
    worker._ioloop = types.SimpleNamespace(stop=lambda: stopped.append(True))
    worker._check()
    assert d.abandoned and len(settler.copies) == 1
    assert settler.copies[0][1].headers[vocab.H_REASON] == "timeout"
    assert worker._exit_code == exitcodes.WORKER_TIMEOUT and stopped
    d.outcome, d.ran_for = vocab.SUCCESS, 61.0       # the thread returns at last
    worker._on_result(d)
    worker._check()
    assert len(settler.copies) == 1 and settler.acks == []


# --- the delivery callback pika calls directly (the hot path) -----------------------

def _consuming_worker():
    from workqd.worker.settle import Settler
    worker = _worker()
    queued = []
    worker._handler = types.SimpleNamespace(submit=queued.append, idle=lambda: not queued,
                                            running=None, busy=lambda: bool(queued),
                                            take_unstarted=lambda: [],
                                            results=collections.deque(), wake_always=True)
    worker._ioloop = types.SimpleNamespace(stop=lambda: None)
    channel = types.SimpleNamespace(is_open=True, acks=[],
                                    basic_ack=lambda tag, multiple=False: None,
                                    basic_nack=lambda tag, requeue=True: None)
    settler = Settler(channel, None, 1, lambda: True, worker, None)
    worker._session = types.SimpleNamespace(channel=channel, settler=settler,
                                            stop_consuming=lambda: None, connection=None)
    return worker, channel, settler, queued


def _method(tag):
    return types.SimpleNamespace(delivery_tag=tag, redelivered=False, routing_key="q",
                                 exchange="")


def test_a_delivery_is_tracked_and_handed_to_the_handler_thread():
    worker, channel, settler, queued = _consuming_worker()
    worker._on_message(channel, _method(1), pika.BasicProperties(message_id="m1"), b"x")
    assert [d.tag for d in queued] == [1] and queued[0].task.message_id == "m1"
    assert settler.pending and settler.received == 1 and worker._received == 1


def test_a_delivery_from_another_sessions_channel_is_ignored():
    worker, channel, settler, queued = _consuming_worker()
    stale = types.SimpleNamespace(is_open=True)
    worker._on_message(stale, _method(1), pika.BasicProperties(message_id="m1"), b"x")
    assert queued == [] and not settler.pending and settler.received == 0


def test_an_internal_error_in_the_delivery_callback_stops_the_worker(monkeypatch, caplog):
    # pika must never see workqd's exception: the callback logs it and stops, as _guard does.
    worker, channel, settler, queued = _consuming_worker()

    def broken(*a):
        raise RuntimeError("boom")
    monkeypatch.setattr(intake, "read_task", broken)
    worker._on_message(channel, _method(1), pika.BasicProperties(message_id="m1"), b"x")
    assert worker._stopping and worker._exit_code == exitcodes.WORKER_CRASH
    assert "internal error in _on_message" in caplog.text and queued == []


# --- prefetch 1: the handler thread acks and counts a success without waking the I/O thread

def _direct_worker(wake_always: bool):
    from tests.unit.test_eagerio import Connection, FakeSocket, transport
    from workqd import eagerio
    from workqd.worker.settle import Settler
    worker = _worker()
    sock = FakeSocket()
    t, *_ = transport(sock)
    channel = types.SimpleNamespace(is_open=True, channel_number=1,
                                    basic_ack=lambda tag, multiple=False: None,
                                    basic_nack=lambda tag, requeue=True: None)
    handler = HandlerThread(lambda body, task: None, worker.slot, 5.0)
    handler.wake_always = wake_always
    worker._handler = handler
    worker._ioloop = types.SimpleNamespace(stop=lambda: None)
    settler = Settler(channel, None, 1, handler.idle, worker, None,
                      eagerio.install(Connection(t)))
    worker._session = types.SimpleNamespace(channel=channel, settler=settler,
                                            stop_consuming=lambda: None, connection=None,
                                            check=lambda now: None, held=False)
    worker._next_consumer_check = float("inf")
    handler.start()
    return worker, channel, settler, sock


def _eventfd_written(handler) -> bool:
    try:
        os.eventfd_read(handler.wake_fd)
        return True
    except BlockingIOError:
        return False


def _deliver_and_wait(worker, channel, tag: int) -> None:
    """One delivery through pika's callback; back once its result is with the I/O thread."""
    done = worker.slot.tasks_done
    worker._on_message(channel, _method(tag), pika.BasicProperties(message_id=f"m{tag}"), b"x")
    wait_for(lambda: worker.slot.tasks_done > done and worker._handler.results, 5,
             interval=0.001, what=f"the handler thread's result for delivery {tag}")


def test_a_quiet_success_is_acked_and_counted_at_once_and_settled_at_the_next_delivery():
    from workqd.worker.settle import ack_frame
    worker, channel, settler, sock = _direct_worker(wake_always=False)
    _deliver_and_wait(worker, channel, 1)
    assert bytes(sock.sent) == ack_frame(1, 1)     # the broker has its ack
    assert worker.slot.tasks_done == 1             # and /metrics counts it
    assert not _eventfd_written(worker._handler)   # the I/O thread slept on
    assert settler.pending                         # its bookkeeping waits for the next delivery
    _deliver_and_wait(worker, channel, 2)          # settles the first as it arrives
    assert settler._unsettled.keys() == {2}
    assert bytes(sock.sent) == ack_frame(1, 1) + ack_frame(1, 2)
    worker._check()                                # or for the tick, after the last one
    assert not settler.pending and not worker._handler.results
    assert worker.slot.tasks_done == 2             # each counted once


def test_a_stopping_worker_settles_the_quiet_result_and_hears_of_every_later_one():
    worker, channel, settler, sock = _direct_worker(wake_always=False)
    _deliver_and_wait(worker, channel, 1)
    assert settler.pending
    worker.stop(exitcodes.WORKER_OK)
    assert not settler.pending and not worker._handler.results   # nothing left owed
    assert worker._handler.wake_always


def test_with_wake_always_a_success_acked_by_the_handler_still_wakes_the_io_thread():
    worker, channel, settler, sock = _direct_worker(wake_always=True)
    _deliver_and_wait(worker, channel, 1)
    assert _eventfd_written(worker._handler) and worker.slot.tasks_done == 1
