"""The master keeps the service up whatever happens to it: real daemon, real broker,
real processes and signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import rawamqp
from conftest import BROKER_URL, free_port, queue_config, wait_for
from .test_control import ctl, start


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True


def test_reload_while_workers_cannot_connect_restarts_the_start(daemon, amqp, qname):
    """SIGHUP during start applies the new config at once; ready once the broker is."""
    d = daemon([queue_config(qname, workers=2)], start=False)
    d.config["broker"]["url"] = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"  # closed
    d.write_config()
    d.start(wait_ready=False)
    wait_for(lambda: len(d.worker_pids()) == 2 and d.log().count("127.0.0.1") >= 2, 20,
             what=lambda: f"two workers trying the closed port; log:\n{d.log()}")
    first = set(d.worker_pids())
    d.send(signal.SIGHUP)
    wait_for(lambda: "reload during start" in d.log(), 10, what=lambda: f"the reload; log:\n{d.log()}")
    # Replaced at once: none of the starting workers is waited for.
    wait_for(lambda: all(_gone(p) for p in first) and len(d.worker_pids()) == 2, 20,
             what=lambda: f"the starting workers replaced; log:\n{d.log()}")
    assert d.proc.poll() is None and d.http("/readyz")[0] == 503
    d.config["broker"]["url"] = BROKER_URL
    d.write_config()
    d.send(signal.SIGHUP)
    d.wait_ready(30)
    # /readyz can say ready a loop turn before the master logs its move to ready.
    wait_for(lambda: "ready: every worker" in d.log(), 10, what=lambda: f"the ready line; log:\n{d.log()}")
    assert d.log().count("reload during start") == 2
    mid = amqp.publish(qname, "sleep=0")
    wait_for(lambda: mid in d.ledger.ended_ids(), 15, what="a task after the start")
    assert "Traceback" not in d.log() and "no transition" not in d.log()
    assert d.stop() == 0


def test_a_worker_killed_by_a_real_time_signal_is_replaced_and_its_task_redone(daemon, amqp,
                                                                               qname):
    d = daemon([queue_config(qname, workers=2)])
    mid = amqp.publish(qname, "sleep=3")
    wait_for(lambda: d.ledger.events("start"), 10, what="the task started")
    victim = d.ledger.events("start")[0]["pid"]
    os.kill(victim, signal.SIGRTMIN + 1)       # systemctl kill -s SIGRTMIN+1 workqd
    wait_for(lambda: f"(pid {victim}) killed by SIGRTMIN+1" in d.log(), 10,
             what=lambda: f"the death logged by name; log:\n{d.log()}")
    wait_for(lambda: mid in d.ledger.ended_ids(), 20, what="the task redone by another worker")
    wait_for(lambda: len(d.worker_pids()) == 2 and victim not in d.worker_pids()
             and d.http("/readyz")[0] == 200, 15, what="the worker replaced")
    assert d.proc.poll() is None and "Traceback" not in d.log()
    assert d.stop() == 0


def test_a_bug_in_the_loop_stops_the_workers_in_order_and_exits_1(daemon, amqp, qname,
                                                                  tmp_path, monkeypatch):
    trigger = tmp_path / "plant-the-bug"
    monkeypatch.setenv("WORKQ_BUG_TRIGGER", str(trigger))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    d = daemon([queue_config(qname, workers=2)], start=False, shutdown_timeout=10)
    env = d.env()
    d.env = lambda: {**env, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    d.start(module="netcheck")
    workers = d.worker_pids()
    assert len(workers) == 2
    mid = amqp.publish(qname, "sleep=2")
    wait_for(lambda: d.ledger.events("start"), 10, what="the task started")
    trigger.touch()
    assert d.proc.wait(30) == 1
    log = d.log()
    assert log.count("Traceback") == 1 and "RuntimeError: a bug planted by the test" in log
    assert "internal error in the master loop" in log and "cannot start" not in log
    # Each worker got TERM: it said so, and the running task was let finish.
    assert log.count("stopping: finishing the running task") == 2, log
    assert mid in d.ledger.ended_ids()
    wait_for(lambda: all(_gone(p) for p in workers), 10, what="no worker left behind")
    messages = []
    while True:
        try:
            messages.append(notify.recv(4096).decode())
        except BlockingIOError:
            break
    notify.close()
    assert any("STOPPING=1" in m for m in messages), messages


def _slow_module(tmp_path: Path, seconds: float) -> dict:
    (tmp_path / "slowimport.py").write_text(
        "import time\n"
        f"time.sleep({seconds})\n\n\n"
        "def work(body, task):\n"
        "    pass\n")
    return {"python": "slowimport:work", "python_path": [str(tmp_path)]}


def test_an_import_past_import_timeout_is_a_boot_failure_and_the_pool_gives_up(daemon, qname,
                                                                                tmp_path):
    d = daemon([queue_config(qname, workers=1, import_timeout=2,
                             handler=_slow_module(tmp_path, 60))], start=False)
    started = time.monotonic()
    d.start(wait_ready=False)
    assert d.proc.wait(60) == 1
    took = time.monotonic() - started
    log = d.log()
    assert log.count("has not loaded its handler after 2s (import_timeout 2s); killing it") == 5
    assert "respawning in 4.0s" in log       # backed off, not respawned at once
    assert (f"pool {qname} cannot stay up: 5 workers in a row died before consuming (the last "
            f"one's handler import ran past import_timeout 2s); stopping workqd") in log
    assert 5 * 2 + 0.5 + 1 + 2 + 4 <= took < 45, took


def test_a_slow_import_within_import_timeout_is_not_taken_for_a_hang(daemon, amqp, qname,
                                                                      tmp_path, monkeypatch):
    """The hang clock (1.5 s here) does not run during the import (4 s, budget 10 s)."""
    monkeypatch.setenv("WORKQ_HUNG_AFTER", "1.5")
    d = daemon([queue_config(qname, workers=1, import_timeout=10,
                             handler=_slow_module(tmp_path, 4))], start=False)
    d.start(module="shortclock", wait_ready=False)
    d.wait_ready(30)
    log = d.log()
    assert "is hung" not in log and "killing it" not in log and "restarts" not in log
    assert log.count("consuming from") == 1
    mid = amqp.publish(qname, "x")
    wait_for(lambda: amqp.count(qname) == 0, 10, what="the task taken")
    assert d.proc.poll() is None and mid
    assert d.stop() == 0


def test_scale_beyond_the_cap_counts_autoscaled_queues_at_their_max(daemon, qname, tmp_path):
    d = start(daemon, tmp_path, [queue_config(qname, workers={"min": 1, "max": 250}),
                                 queue_config(f"{qname}.b", workers=1)])
    r = ctl(d, "scale", f"{qname}.b", "10")
    assert r.returncode == 1, r
    assert "at most 256 workers in all; the other queues may have 250" in r.stderr
    assert ctl(d, "scale", f"{qname}.b", "6").returncode == 0     # 250 + 6: the cap itself
    r = ctl(d, "scale", f"{qname}.b", "7")
    assert r.returncode == 1 and "the other queues may have 250" in r.stderr
    assert d.proc.poll() is None


def test_a_full_slot_table_defers_the_spawn_and_the_reload_completes(daemon, amqp, qname,
                                                                     monkeypatch):
    """3 slots, 2 workers, one busy: a reload needs a fourth slot for a while."""
    monkeypatch.setenv("WORKQ_SLOTS", "3")
    d = daemon([queue_config(qname, workers=2)], start=False)
    d.start(module="smalltable")
    # Ready to systemd means both workers consume; a reload before that restarts the start.
    wait_for(lambda: "every worker is consuming" in d.log(), 15,
             what=lambda: f"both workers consuming; log:\n{d.log()}")
    mid = amqp.publish(qname, "sleep=4")
    wait_for(lambda: d.ledger.events("start"), 10, what="the task started")
    d.send(signal.SIGHUP)
    wait_for(lambda: "reload complete" in d.log(), 30,
             what=lambda: f"reload complete; log:\n{d.log()}")
    log = d.log()
    assert log.count("cannot start a worker: no free worker slot (3 in use)") == 1, log
    assert "workers can be started again" in log
    wait_for(lambda: mid in d.ledger.ended_ids(), 15, what="the busy worker's task done")
    assert d.proc.poll() is None and "Traceback" not in d.log()
    assert d.stop() == 0


STUCK_LINE = re.compile(r"queue poller \(pid (\d+)\) has not reported for")


def start_through(relay: rawamqp.Relay, daemon, queues: list[dict], **top):
    """A daemon whose broker is reached through ``relay``, started by tests/shortclock.py
    (the clocks the environment shortens), not waited for."""
    d = daemon(queues, start=False, **top)
    d.config["broker"]["url"] = f"amqp://guest:guest@127.0.0.1:{relay.port}/%2F"
    d.write_config()
    d.start(module="shortclock", wait_ready=False)
    return d


def test_a_poller_whose_broker_stops_answering_is_replaced_and_ready_says_so(
        daemon, qname, monkeypatch):
    """The poller's calls have no deadline of their own: a broker that keeps the
    connection up but never answers a declare would leave /readyz and the depth gauges
    on the last word for ever. The master replaces a poller silent past STUCK_AFTER
    (5 s here, 60 s in production) and says meanwhile that it knows nothing."""
    # A broker that keeps the connection up (heartbeats pass) and never answers a
    # declare, as one in trouble can.
    relay = rawamqp.Relay(drop=rawamqp.QUEUE_DECLARE)
    try:
        monkeypatch.setenv("WORKQ_POLLER_STUCK_AFTER", "5")
        d = start_through(relay, daemon, [queue_config(qname, workers=1)])
        d.wait_ready(30)
        relay.dropping.set()
        # On a loaded machine a poller's round has itself outlasted the test's 5 s, and
        # the master replaced that poller before any declare was dropped: the line that
        # counts is one written after a declare has gone unanswered.
        wait_for(lambda: relay.dropped >= 1, 30, what="a queue.declare dropped")
        since = len(d.log())
        named = wait_for(lambda: STUCK_LINE.search(d.log()[since:]), 30,
                         what=lambda: f"the stuck poller named; log:\n{d.log()}")
        stuck = int(named.group(1))
        status, reason = d.http("/readyz")
        assert status == 503 and "broker not reachable from the master" in reason, reason
        wait_for(lambda: d.poller_pid() not in (None, stuck), 10, what="a new poller")
        relay.dropping.clear()
        d.wait_ready(30)   # the new poller's first round answers: ready again
        assert d.proc.poll() is None
        assert d.stop() == 0
    finally:
        relay.close()


def test_a_worker_whose_consumer_check_goes_unanswered_consumes_again(
        daemon, amqp, qname, monkeypatch):
    """A worker asks the broker about its queue every CONSUMER_CHECK_EVERY seconds. A
    broker that keeps the connection up but never answers must not leave the worker
    waiting for that answer for ever: past CONSUMER_CHECK_UNANSWERED (2 s here, 60 s in
    production) it drops the connection and consumes again on a new one."""
    relay = rawamqp.Relay(drop=rawamqp.QUEUE_DECLARE)
    try:
        monkeypatch.setenv("WORKQ_CONSUMER_CHECK_EVERY", "0.5")
        monkeypatch.setenv("WORKQ_CONSUMER_CHECK_UNANSWERED", "2")
        d = start_through(relay, daemon, [queue_config(qname, workers=1)])
        d.wait_ready(30)
        since = len(d.log())
        relay.dropping.set()
        wait_for(lambda: "has not answered the consumer check" in d.log()[since:], 30,
                 what=lambda: f"the worker giving up on its check; log:\n{d.log()[since:]}")
        relay.dropping.clear()   # the new connection's declares are answered
        task = amqp.publish(qname, "sleep=0")
        wait_for(lambda: task in d.ledger.ended_ids(), 30,
                 what=lambda: f"a task run after the worker consumed again; log:\n"
                              f"{d.log()[since:]}")
        assert d.proc.poll() is None
        assert d.stop() == 0
    finally:
        relay.close()


def test_a_worker_whose_declarations_go_unanswered_starts_again(daemon, amqp, qname,
                                                                monkeypatch):
    """The same broker from the first connection on: the worker's declarations are never
    answered. It cuts that connection after CONSUMER_CHECK_UNANSWERED (2 s here) and
    consumes once the broker answers again, instead of starting for ever."""
    relay = rawamqp.Relay(drop=rawamqp.QUEUE_DECLARE)
    relay.dropping.set()
    try:
        monkeypatch.setenv("WORKQ_CONSUMER_CHECK_EVERY", "0.5")
        monkeypatch.setenv("WORKQ_CONSUMER_CHECK_UNANSWERED", "2")
        monkeypatch.setenv("WORKQ_POLLER_STUCK_AFTER", "5")   # it is held up as well
        d = start_through(relay, daemon, [queue_config(qname, workers=1)])
        wait_for(lambda: "has not answered the declarations" in d.log(), 60,
                 what=lambda: f"the worker giving up on its declarations; log:\n{d.log()}")
        relay.dropping.clear()
        d.wait_ready(60)
        task = amqp.publish(qname, "sleep=0")
        wait_for(lambda: task in d.ledger.ended_ids(), 30, what="a task run")
        assert d.proc.poll() is None
        assert d.stop() == 0
    finally:
        relay.close()
