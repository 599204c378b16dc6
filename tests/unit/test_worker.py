"""The worker's and the master's logic with fakes: intake, thread hand-off, timeouts,
slot ownership, the pool's exit table and state machine, master phases, failover.
No broker and no real worker processes; a few milliseconds each."""

from __future__ import annotations

import os
import signal
import threading
import time
import types

import pika
import pytest
from hypothesis import given, settings, strategies as st

from workqd import config, exitcodes, state, vocab
from workqd.broker import Failover
from workqd.pool import (BACKOFF, BOOT_FAILED, CRASHED, FATAL, GAVE_UP, MAX_BOOT_FAILURES,
                         RECYCLED, RETIRED, RUNNING, Pool, WorkerProc, classify)
from workqd.runner import Task
from workqd.slots import CONNECTING, SlotTable, Totals
from workqd.worker import Worker
from workqd.worker import intake
from workqd.worker.handler import HandlerThread
from workqd.worker.intake import Delivery

CFG = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}, "timeout": 5,
                                "retry": {"attempts": 1}}]}, "t.yaml")
QUEUE = CFG.queues[0]


# --- intake: someone else's input, never an exception -------------------------

def test_malformed_attempt_header_is_named_not_raised():
    for bad in ("abc", [1], 0, -3, 10**12, 1.5, True, {"a": 1}, b"\xff"):
        task, problem = intake.read_task("q", False, pika.BasicProperties(
            headers={vocab.H_ATTEMPT: bad}), b"x")
        assert problem and vocab.H_ATTEMPT in problem and task.attempt == 1, bad


def test_unreadable_delivery_count_falls_back_to_zero():
    task, problem = intake.read_task("q", True, pika.BasicProperties(
        headers={"x-delivery-count": "zz"}), b"x")
    assert problem is None and task.delivery_count == 0


def test_numeric_string_attempt_is_accepted():
    task, problem = intake.read_task("q", False, pika.BasicProperties(
        headers={vocab.H_ATTEMPT: "2"}), b"x")
    assert problem is None and task.attempt == 2


_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text()
                       | st.binary(), lambda inner: st.lists(inner) | st.dictionaries(
                           st.text(), inner), max_leaves=10)


@settings(max_examples=150, deadline=None)
@given(headers=st.one_of(st.none(), st.dictionaries(
    st.sampled_from([vocab.H_ATTEMPT, "x-delivery-count", "x-death", "k"]) | st.text(),
    _VALUES, max_size=5)), mid=st.one_of(st.none(), st.text()), body=st.binary(max_size=64),
    redelivered=st.booleans())
def test_intake_never_raises(headers, mid, body, redelivered):
    task, problem = intake.read_task("q", redelivered, pika.BasicProperties(
        headers=headers, message_id=mid), body)
    assert isinstance(task.message_id, str) and task.message_id
    assert isinstance(task.attempt, int) and task.attempt >= 1
    assert isinstance(task.delivery_count, int) and task.delivery_count >= 0
    assert problem is None or isinstance(problem, str)


_PROPS = st.fixed_dictionaries({}, optional={
    "content_type": st.text(), "priority": st.integers(0, 255), "timestamp": st.integers(0, 2**40),
    "correlation_id": st.text(), "app_id": st.text(), "type": st.text()})


@settings(max_examples=150, deadline=None)
@given(headers=st.dictionaries(st.text(), _VALUES | st.datetimes() | st.decimals(), max_size=5),
       props=_PROPS, routing_key=st.one_of(st.none(), st.text(), st.binary()),
       exchange=st.one_of(st.text(), st.none()))
def test_metadata_of_any_delivery_is_json(headers, props, routing_key, exchange):
    import json
    from workqd import runner
    task, _ = intake.read_task("q", False, pika.BasicProperties(headers=headers, **props), b"x",
                               routing_key, exchange)
    assert isinstance(task.routing_key, str) and isinstance(task.exchange, str)
    doc = json.loads(runner.metadata(task))
    assert doc["queue"] == "q" and doc["properties"] == json.loads(json.dumps(props))
    assert set(doc["headers"]) == {str(k) for k in headers}


def test_metadata_makes_headers_json_safe():
    import datetime
    import decimal
    import json
    from workqd import runner
    task, _ = intake.read_task("q", True, pika.BasicProperties(headers={
        "bin": b"\xffok", "when": datetime.datetime(2026, 1, 2, 3, 4, 5), "d": decimal.Decimal("1.5"),
        "nested": {"list": [1, b"a", None]}, "inf": float("inf")}, priority=7), b"x",
        "thumbs.big", "uploads")
    doc = json.loads(runner.metadata(task))
    assert doc["headers"] == {"bin": "\ufffdok", "when": "2026-01-02T03:04:05", "d": "1.5",
                              "nested": {"list": [1, "a", None]}, "inf": "inf"}
    assert (doc["routing_key"], doc["exchange"], doc["redelivered"]) == ("thumbs.big", "uploads",
                                                                        True)
    assert doc["properties"] == {"priority": 7}


# --- slot ownership (race 2 of issue 9) ------------------------------------------

def test_task_finishing_during_a_reconnect_does_not_make_the_worker_consuming():
    slot = SlotTable(capacity=1).allocate(1)
    slot.subscribed()
    slot.begin("m1", False, time.monotonic())   # handler thread
    slot.set_state(CONNECTING)             # I/O thread: connection lost
    assert not slot.consuming and slot.message_id() == "m1"   # still truthfully held
    slot.end()                             # handler thread finishes meanwhile
    assert not slot.consuming and slot.message_id() is None
    slot.subscribed()
    assert slot.consuming


def test_a_recycling_worker_never_shows_as_leaving_while_its_last_task_waits_to_begin():
    # The CI run of stop 15 caught the master's gauges in that window: the I/O thread
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
    first = Delivery(None, 1, b"", pika.BasicProperties(), Task("m1", "q", {}, False, 0, 1))
    last = Delivery(None, 2, b"", pika.BasicProperties(), Task("m2", "q", {}, False, 0, 1))
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


# --- the handler thread publishes a task with its start (race 1 of issue 9) -------

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

    def __init__(self):
        self.copies, self.acks = [], []

    def publish_copy(self, d, s):
        self.copies.append((d.tag, s))
        return True

    def ack(self, d):
        self.acks.append(d.tag)
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
    handler = types.SimpleNamespace(running=d,
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


# --- the delivery callback pika calls directly (issue 9's hot path) -----------------

def _consuming_worker():
    from workqd.worker.settle import Settler
    worker = _worker()
    queued = []
    worker._handler = types.SimpleNamespace(submit=queued.append, idle=lambda: not queued,
                                            running=None, busy=lambda: bool(queued),
                                            take_unstarted=lambda: [])
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


# --- the pool: exit table and state machine, with fake processes ------------------

def _status_exit(code):
    return code << 8


def _status_signal(sig):
    return sig


@pytest.mark.parametrize("retiring, status, consumed, kind", [
    ("reload", _status_exit(0), True, RETIRED),
    ("shutdown", _status_signal(signal.SIGKILL), True, RETIRED),
    (None, _status_exit(exitcodes.WORKER_BOOT_ERROR), False, GAVE_UP),
    (None, _status_exit(exitcodes.WORKER_BROKER_REFUSED), True, GAVE_UP),
    (None, _status_exit(exitcodes.WORKER_BAD_SETTINGS), False, GAVE_UP),
    (None, _status_exit(exitcodes.WORKER_QUEUE_MISSING), False, GAVE_UP),
    (None, _status_exit(exitcodes.WORKER_CONSUMER_TIMEOUT), True, "consumer_timeout"),
    (None, _status_exit(exitcodes.WORKER_RECYCLE), True, RECYCLED),
    (None, _status_signal(signal.SIGKILL), True, CRASHED),
    (None, _status_signal(signal.SIGKILL), False, CRASHED),   # killed, not a broken start
    (None, _status_exit(exitcodes.WORKER_CRASH), True, CRASHED),
    (None, _status_exit(exitcodes.WORKER_CRASH), False, BOOT_FAILED),
])
def test_exit_classification(retiring, status, consumed, kind):
    proc = WorkerProc(1, 1, None, retiring=retiring)
    assert classify(proc, status, None, consumed).kind == kind


class FakePool(Pool):
    """Spawns slots instead of processes."""

    def spawn_worker(self, number):
        slot = self.slots.allocate(self.pool_id)
        pid = 100000 + len(self.spawned)
        self.spawned.append(pid)
        slot.set_pid(pid)
        proc = WorkerProc(pid, number, slot)
        self.procs[pid] = proc
        return proc


def _pool(workers=2):
    q = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"},
                                  "workers": workers}]}, "t.yaml").queues[0]
    pool = FakePool(queue=q, pool_id=1, restarts=dict.fromkeys(vocab.RESTART_REASONS, 0),
                    broker=CFG.broker, slots=SlotTable(capacity=64), totals=Totals(), wake_fd=-1,
                    log_level="info", child_init=lambda: None)
    pool.spawned = []
    return pool


def test_boot_failures_back_off_then_give_up():
    pool, now = _pool(workers=1), 0.0
    delays = []
    for i in range(MAX_BOOT_FAILURES):
        pool.spawn_workers(now)
        assert len(pool.procs) == 1
        pool.on_exit(next(iter(pool.procs.values())), _status_exit(exitcodes.WORKER_CRASH), now)
        if pool.state == FATAL:
            break
        assert pool.state == BACKOFF
        delays.append(pool.next_spawn - now)
        pool.spawn_workers(now)        # still backing off: nothing spawned
        assert not pool.procs
        now = pool.next_spawn
    assert pool.state == FATAL and i == MAX_BOOT_FAILURES - 1
    assert delays == sorted(delays) and delays[0] < delays[-1]


def test_killed_workers_that_never_consumed_are_not_a_crash_loop():
    pool, now = _pool(workers=1), 0.0
    for _ in range(3 * MAX_BOOT_FAILURES):
        pool.spawn_workers(now)
        pool.on_exit(next(iter(pool.procs.values())), _status_signal(signal.SIGKILL), now)
        now = max(now, pool.next_spawn) + 0.01
    assert pool.state == RUNNING and pool.restarts["crash"] == 3 * MAX_BOOT_FAILURES


def test_fatal_exit_stops_the_pool_at_once():
    pool = _pool()
    pool.spawn_workers(0)
    pool.on_exit(next(iter(pool.procs.values())), _status_exit(exitcodes.WORKER_QUEUE_MISMATCH), 0)
    assert pool.state == FATAL and "other arguments" in pool.fatal_reason
    pool.spawn_workers(0)
    assert len(pool.procs) == 1    # no respawn


def test_consuming_again_leaves_backoff():
    pool = _pool(workers=1)
    pool.spawn_workers(0)
    pool.on_exit(next(iter(pool.procs.values())), _status_exit(exitcodes.WORKER_CRASH), 0)
    assert pool.state == BACKOFF
    pool.spawn_workers(pool.next_spawn)
    next(iter(pool.procs.values())).slot.subscribed()
    pool.note_progress()
    assert pool.state == RUNNING and pool.boot_failures == 0


def test_crash_holding_a_message_is_recorded_for_poison_detection():
    pool = _pool()
    pool.spawn_workers(0)
    proc = next(iter(pool.procs.values()))
    proc.slot.subscribed()
    proc.slot.begin("poison-1", False, time.monotonic())
    pool.on_exit(proc, _status_signal(signal.SIGSEGV), 0)
    assert pool.slots.crashes(1, "poison-1", me=0) == 1
    assert pool.restarts["crash"] == 1 and pool.state == RUNNING


def test_reload_retires_old_workers_only_as_new_ones_consume():
    pool = _pool(workers=2)
    pool.spawn_workers(0)
    old = list(pool.procs.values())
    for p in old:
        p.slot.subscribed()
        p.retiring = "reload"
    signalled = []
    pool.signal_worker = lambda proc, sig: (signalled.append(proc.pid),
                                            setattr(proc, "signaled", True))
    pool.spawn_workers(0)
    new = [p for p in pool.procs.values() if p not in old]
    assert len(new) == 2
    pool.retire_surplus()
    assert signalled == []                # no new worker consumes yet: keep the old ones
    new[0].slot.subscribed()
    pool.retire_surplus()
    assert signalled == [old[0].pid]      # one in, one out
    new[1].slot.subscribed()
    pool.retire_surplus()
    assert signalled == [old[0].pid, old[1].pid]


# --- master phases and failover -----------------------------------------------------

def test_master_phases_only_move_along_the_table():
    for phase, allowed in state.PHASES.items():
        for target in state.PHASES:
            if target == phase:
                continue
            ok = target in allowed
            assert ok == (target in state.PHASES[phase])
    assert state.STOPPING not in state.PHASES[state.STOPPING] and not state.PHASES[state.STOPPING]
    from workqd.master import Master
    m = Master(CFG)
    m.enter(state.READY)
    m.enter(state.RELOADING)
    m.enter(state.READY)
    m.enter(state.STOPPING)
    with pytest.raises(RuntimeError):
        m.enter(state.READY)


def test_failover_spreads_rotates_and_backs_off():
    urls = ["amqp://a", "amqp://b", "amqp://c"]
    assert [Failover(urls, start=k).current for k in range(4)] == urls + urls[:1]
    f = Failover(urls)
    delays = [f.failed() for _ in range(6)]
    assert delays[:2] == [0.0, 0.0] and delays[2] > 0 and delays[3:] == sorted(delays[3:])
    assert f.current == "amqp://a"  # every node tried in turn
    f.succeeded()
    assert f.failed() == 0.0
    single = Failover(["amqp://a"])
    assert [single.failed() for _ in range(3)] == [0.25, 0.5, 1.0]
    assert max(single.failed() for _ in range(20)) == 15.0


# --- what the broker's closes and errors mean ------------------------------------

def test_close_codes_and_open_errors_are_classified():
    import ssl
    import pika.exceptions
    from workqd.worker.session import classify_channel_close, classify_open_error
    q = QUEUE
    assert classify_channel_close(406, "PRECONDITION_FAILED - inequivalent arg 'x-queue-type'",
                                  True, q).exit_code == exitcodes.WORKER_QUEUE_MISMATCH
    timeout = classify_channel_close(
        406, "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout "
        "value used: 5000 ms.", False, q)
    assert timeout.exit_code == exitcodes.WORKER_CONSUMER_TIMEOUT and "consumer_timeout" in timeout.why
    # A queue whose home node is down may come back: retry, never a login error.
    down = classify_channel_close(404, "NOT_FOUND - home node 'wqa@localhost' of durable queue "
                                  "'q.delay.5s' in vhost '/' is down or inaccessible", True, q)
    assert down.exit_code is None
    assert classify_channel_close(403, "ACCESS_REFUSED", True, q).exit_code == \
        exitcodes.WORKER_BROKER_REFUSED
    assert classify_open_error(pika.exceptions.ProbableAuthenticationError("x"),
                               "amqp://u:secret@h").exit_code == exitcodes.WORKER_BROKER_REFUSED
    assert "secret" not in classify_open_error(ConnectionRefusedError(), "amqp://u:secret@h").why
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "Hostname mismatch, certificate is not valid for 'wrong.invalid'."
    wrapped = pika.exceptions.AMQPConnectionError(OSError(cert))
    verdict = classify_open_error(wrapped, "amqps://h")
    assert verdict.exit_code == exitcodes.WORKER_BAD_SETTINGS and "Hostname mismatch" in verdict.why
    assert classify_open_error(OSError("reset"), "amqps://h").exit_code is None


def test_a_client_certificate_refused_after_the_handshake_is_a_tls_failure():
    import pika.exceptions
    from workqd.worker.session import classify_open_error
    error = pika.exceptions.IncompatibleProtocolError(
        "StreamLostError: (\"Stream connection lost: SSLError(1, '[SSL: "
        "TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required')\",)")
    verdict = classify_open_error(error, "amqps://h")
    assert verdict.exit_code == exitcodes.WORKER_BAD_SETTINGS
    assert "certificate required" in verdict.why


def test_an_eof_right_after_the_handshake_is_retried_not_a_stop():
    # The same refusal when pika's first write loses the race with the server's close:
    # only an EOF is left, which a broker going down mid-handshake gives too. Retried;
    # the next attempt usually reads the alert and stops with the line above.
    import pika.exceptions
    from workqd.worker.session import classify_open_error
    error = pika.exceptions.IncompatibleProtocolError(
        "StreamLostError: (\"Stream connection lost: SSLEOFError(8, 'EOF occurred in "
        "violation of protocol (_ssl.c:2427)')\",)")
    verdict = classify_open_error(error, "amqps://h")
    assert verdict.exit_code is None and "cannot connect to amqps://h" in verdict.why


# --- the periodic consumer check (session.consumer_check) -------------------------------

def test_consumer_check_sees_a_lost_consumer_and_a_starved_one():
    from workqd.worker.session import consumer_check
    assert "counts no consumer" in consumer_check(0, 0, 0, False, True)
    # Tasks wait, nothing came, nothing held: the broker does not deliver to us.
    assert "17 task(s) wait" in consumer_check(3, 17, 0, False, True)
    # Normal: deliveries came, or the worker is full, or nothing waits.
    assert consumer_check(3, 17, 5, False, True) == ""
    assert consumer_check(3, 17, 0, True, True) == ""
    assert consumer_check(3, 0, 0, False, True) == ""
    # A single-active-consumer queue (or someone else's): idle consumers are normal.
    assert consumer_check(3, 17, 0, False, False) == ""
    assert "counts no consumer" in consumer_check(0, 17, 0, False, False)
