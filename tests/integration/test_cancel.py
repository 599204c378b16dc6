"""Cancelling tasks by message id: real daemons, the real broker and its cancel log.

A cancel goes to the vhost's stream ``workq.cancel``; each daemon's poller reads it
into the table its workers look up. A waiting task is dead-lettered unrun, a
running one is stopped (a command's process group gets TERM; a Python handler's
worker is replaced), and either way it ends in ``<queue>.dead`` as ``cancelled``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika
import pytest

from conftest import BROKER_URL, ROOT, Amqp, queue_config, rabbitmqctl, wait_for
from workqd import cancels
from workqd.client import Client

OUTCOME = "workqd_tasks_processed_total"


def ctl(d, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "workqd.ctl", "-c", str(d.path), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def start(daemon, tmp_path, queues, **top):
    sock = str(tmp_path / f"c{uuid.uuid4().hex[:6]}.sock")
    d = daemon(queues, control={"socket": sock}, **top)
    d.sock = sock
    return d


def status(d) -> dict:
    r = ctl(d, "--socket", d.sock, "status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def cancel(d, *ids: str) -> float:
    """workqctl cancel; returns when it exited (time.monotonic())."""
    r = ctl(d, "cancel", *ids)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == list(ids)
    return time.monotonic()


def consumers(amqp, queue: str) -> int:
    return amqp.channel().queue_declare(queue, passive=True).method.consumer_count


def dead_letters(amqp, queue: str) -> list:
    return amqp.get_all(f"{queue}.dead")


def read_by(d, mid: str) -> bool:
    return f"cancel of message {mid} read" in d.log()


def report(what: str, seconds: float) -> None:
    print(f"\nmeasured: {what}: {seconds:.3f}s")


@pytest.fixture
def client(broker):
    c = Client(BROKER_URL)
    yield c
    c.close()


def test_a_waiting_task_is_dead_lettered_unrun_and_requeue_puts_it_back(daemon, amqp, qname,
                                                                        tmp_path):
    d = start(daemon, tmp_path, [queue_config(qname, workers=1)])
    assert ctl(d, "--socket", d.sock, "pause", qname).returncode == 0
    # The broker's word: the worker cancels its consumer on its next tick.
    wait_for(lambda: consumers(amqp, qname) == 0, 10, what="no consumer")
    mid = amqp.publish(qname, "n=1")
    kept = amqp.publish(qname, "n=2")
    done = cancel(d, mid)
    wait_for(lambda: read_by(d, mid), 10, interval=0.02, what="the poller read the cancel")
    report("workqctl cancel exit -> the poller's log line", time.monotonic() - done)
    # The poller counts the table once a round (every 5 s).
    wait_for(lambda: (status(d)["cancels"] or 0) >= 1, 15, what="status counts the cancel")
    assert "cancels held: " in ctl(d, "--socket", d.sock, "status").stdout
    assert ctl(d, "--socket", d.sock, "resume", qname).returncode == 0
    wait_for(lambda: kept in d.ledger.ended_ids(), 20, what="the other task ran")
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 20, what="the cancelled one dead")
    assert mid not in {e["id"] for e in d.ledger.events("start")}
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="cancelled") == 1, 10,
             what="counted as cancelled")
    assert d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 0
    assert d.stop() == 0
    r = ctl(d, "dead", qname, "list", "--json")
    assert r.returncode == 0, r.stderr
    (item,) = json.loads(r.stdout)
    assert (item["id"], item["reason"]) == (mid, "cancelled")
    assert item["error"].startswith("cancelled by workqctl cancel at ")
    r = ctl(d, "dead", qname, "requeue", "--reason", "cancelled")
    assert r.returncode == 0, r.stderr
    assert amqp.count(qname) == 1 and amqp.count(f"{qname}.dead") == 0
    (props, _), = amqp.get_all(qname)
    assert props.message_id == mid and "x-workq-reason" not in (props.headers or {})


def test_a_delayed_task_cancelled_while_it_waits_never_runs(daemon, amqp, qname, tmp_path,
                                                            client):
    d = start(daemon, tmp_path, [queue_config(qname, workers=1)])
    # Due in 15 s: on a loaded machine submitting, cancelling and reading have taken
    # over 5 s, and a cancel read after the task was due proves nothing.
    mid = client.submit(b"n=1", queue=qname, delay=15)
    other = client.submit(b"n=2", queue=qname, delay=15)
    submitted = time.monotonic()
    cancel(d, mid)
    wait_for(lambda: read_by(d, mid), 15, interval=0.05, what="the poller read the cancel")
    assert time.monotonic() - submitted < 15, "read after the task was due: no proof"
    wait_for(lambda: other in d.ledger.ended_ids(), 30, what="the other delayed task ran")
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 20, what="the cancelled one dead")
    assert mid not in {e["id"] for e in d.ledger.events("start")}
    (props, _), = dead_letters(amqp, qname)
    assert (props.message_id, props.headers["x-workq-reason"]) == (mid, "cancelled")


def test_a_running_command_gets_term_and_is_dead_lettered(daemon, amqp, qname, tmp_path):
    pidfile, termed = tmp_path / "pid", tmp_path / "termed"
    script = tmp_path / "long.sh"
    # The trap records that SIGTERM reached the command's process group.
    script.write_text(f"""#!/bin/sh
trap 'echo term > {termed}; exit 143' TERM
echo $$ > {pidfile}
while :; do sleep 0.1; done
""")
    script.chmod(0o755)
    d = start(daemon, tmp_path, [queue_config(qname, workers=1, timeout=120, timeout_grace=10,
                                              handler={"command": [str(script)]},
                                              retry={"attempts": 3, "backoff": [1]})])
    mid = amqp.publish(qname, "x")
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20,
             what="the command running")
    pid = int(pidfile.read_text())
    worker = d.worker_pids()
    done = cancel(d, mid)
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 10, interval=0.05,
             what="dead-lettered as cancelled")
    report("workqctl cancel exit -> a running command stopped and dead-lettered",
           time.monotonic() - done)
    assert termed.read_text() == "term\n"
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    (props, _), = dead_letters(amqp, qname)
    assert (props.message_id, props.headers["x-workq-reason"]) == (mid, "cancelled")
    assert "stopped on SIGTERM within its grace" in props.headers["x-workq-error"]
    assert d.worker_pids() == worker   # a command is stopped in place: same worker
    assert amqp.count(qname) == 0      # not retried
    amqp.publish(qname, "y")
    wait_for(lambda: pidfile.read_text().strip() != str(pid), 20, what="the next task runs")


def test_a_running_python_task_replaces_its_worker_and_is_not_retried(daemon, amqp, qname,
                                                                      tmp_path):
    d = start(daemon, tmp_path, [queue_config(qname, workers=1,
                                              retry={"attempts": 3, "backoff": [1]})])
    mid = amqp.publish(qname, "sleep=60")
    wait_for(lambda: any(e["id"] == mid for e in d.ledger.events("start")), 20,
             what="the task running")
    (worker,) = d.worker_pids()
    done = cancel(d, mid)
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 10, interval=0.05,
             what="dead-lettered as cancelled")
    report("workqctl cancel exit -> a running Python task dead-lettered",
           time.monotonic() - done)
    wait_for(lambda: len(d.worker_pids()) == 1 and d.worker_pids() != [worker], 20,
             what="the worker replaced")
    # Its own reason: a cancel is no recycle (max_tasks_per_worker) and no crash.
    wait_for(lambda: d.metric("workqd_worker_restarts_total", queue=qname,
                              reason="cancelled") == 1, 10, what="the restart counted")
    assert d.metric("workqd_worker_restarts_total", queue=qname, reason="recycle") == 0
    assert d.metric("workqd_worker_restarts_total", queue=qname, reason="crash") == 0
    (props, _), = dead_letters(amqp, qname)
    assert (props.message_id, props.headers["x-workq-reason"]) == (mid, "cancelled")
    assert "while running" in props.headers["x-workq-error"]
    after = amqp.publish(qname, "n=after")
    wait_for(lambda: after in d.ledger.ended_ids(), 20, what="the replacement works")
    assert [e["id"] for e in d.ledger.events("start")].count(mid) == 1   # never again
    assert mid not in d.ledger.ended_ids() and amqp.count(qname) == 0


def test_a_task_cancelled_while_buffered_behind_another_is_skipped_in_place(daemon, amqp,
                                                                           qname, tmp_path):
    d = start(daemon, tmp_path, [queue_config(qname, workers=1, prefetch=5)])
    # The first task runs until the cancel has been read: how long reading takes on a
    # loaded machine is not what this test is about.
    gate = tmp_path / "gate"
    first = amqp.publish(qname, f"gate={gate}")
    wait_for(lambda: any(e["id"] == first for e in d.ledger.events("start")), 20,
             what="the first task running")
    behind = amqp.publish(qname, "n=2")
    wait_for(lambda: amqp.count(qname) == 0, 10, what="the second one delivered, waiting")
    (worker,) = d.worker_pids()
    cancel(d, behind)
    wait_for(lambda: read_by(d, behind), 20, what="the cancel read")
    gate.touch()
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 20, what="dead-lettered")
    assert first in d.ledger.ended_ids()
    assert behind not in {e["id"] for e in d.ledger.events("start")}
    (props, _), = dead_letters(amqp, qname)
    assert (props.message_id, props.headers["x-workq-reason"]) == (behind, "cancelled")
    assert d.worker_pids() == [worker]   # never started: nothing to stop, no replacement


def test_a_restarted_daemon_reads_the_log_again_and_refuses_the_task(daemon, amqp, qname,
                                                                     tmp_path):
    one = start(daemon, tmp_path, [queue_config(qname, workers=1)])
    two = start(daemon, tmp_path, [queue_config(qname, workers=1)])
    for d in (one, two):
        assert ctl(d, "--socket", d.sock, "pause", qname).returncode == 0
    wait_for(lambda: consumers(amqp, qname) == 0, 10, what="no consumer")
    mid = amqp.publish(qname, "n=1")
    cancel(one, mid)
    wait_for(lambda: read_by(one, mid) and read_by(two, mid), 10, what="both read it")
    assert two.stop() == 0
    # Started afresh, unpaused: its workers consume at once, the cancelled task waiting.
    two.start()
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 20, what="refused by the restarted one")
    assert mid not in {e["id"] for e in one.ledger.events("start") + two.ledger.events("start")}
    (props, _), = dead_letters(amqp, qname)
    assert props.headers["x-workq-reason"] == "cancelled"
    assert "cancel log workq.cancel read" in two.log()


@pytest.fixture
def fresh_vhost(broker):
    """A vhost of its own (deleted after), so its cancel log starts empty, as on a new
    broker: the broker's count of a young stream lags furthest behind."""
    vhost = f"wq_cancel_{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


def test_a_cancel_sent_just_before_the_daemon_starts_is_read_before_any_task(daemon, qname,
                                                                              tmp_path,
                                                                              fresh_vhost):
    """The broker counts a stream's entries in statistics it emits every few seconds: a
    cancel confirmed just before the start is not in that count yet. The poller's own mark
    at the log's end is: the workers consume only once it is read back."""
    vhost_amqp, canceller = Amqp(fresh_vhost), Client(fresh_vhost)
    try:
        for _ in range(3):
            d = start(daemon, tmp_path, [queue_config(qname, workers=1)], start=False,
                      broker={"url": fresh_vhost})
            vhost_amqp.declare(qname, "classic")
            mid = vhost_amqp.publish(qname, "n=1")
            canceller.cancel(mid)
            d.start()
            wait_for(lambda: vhost_amqp.count(f"{qname}.dead") == 1, 20,
                     what="refused at the start")
            assert mid not in {e["id"] for e in d.ledger.events("start")}
            (props, _), = dead_letters(vhost_amqp, qname)
            assert (props.message_id, props.headers["x-workq-reason"]) == (mid, "cancelled")
            assert d.stop() == 0
    finally:
        canceller.close()
        vhost_amqp.close()


def test_without_write_permission_the_poller_reads_the_log_by_its_count(daemon, qname,
                                                                        tmp_path, broker_user,
                                                                        client):
    user, password = broker_user
    # A publish needs write permission on the exchange: without it on the default one the
    # poller cannot append its mark, and goes by the stream's message count instead.
    rabbitmqctl("set_permissions", "-p", "/", user, ".*", r"^(?!amq\.default$).*", ".*")
    d = start(daemon, tmp_path, [queue_config(qname, workers=1)], start=False,
              broker={"url": f"amqp://{user}:{password}@127.0.0.1:5672/%2F"})
    d.start()
    wait_for(lambda: "cancel log workq.cancel read" in d.log(), 15, what="the log read")
    assert "cannot mark the end of the cancel log workq.cancel" in d.log()
    mid = f"unmarked-{uuid.uuid4().hex}"
    client.cancel(mid)
    wait_for(lambda: read_by(d, mid), 10, what="the cancel read")
    assert d.log().count("cannot mark the end") == 1   # once per connection, not per round
    assert "Traceback" not in d.log()


def test_cancelling_an_id_not_seen_yet_holds_for_a_later_publish(daemon, amqp, qname, tmp_path):
    d = start(daemon, tmp_path, [queue_config(qname, workers=1)])
    mid = f"later-{uuid.uuid4().hex}"
    cancel(d, mid)
    wait_for(lambda: read_by(d, mid), 10, what="read")
    amqp.publish(qname, "n=1", message_id=mid)
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 20, what="refused")
    assert mid not in {e["id"] for e in d.ledger.events("start")}


def test_the_poller_reads_the_log_again_on_a_new_connection(daemon, amqp, qname, tmp_path,
                                                             broker_user, client):
    user, password = broker_user
    d = start(daemon, tmp_path, [queue_config(qname, workers=1)], start=False)
    d.config["broker"] = {"url": f"amqp://{user}:{password}@127.0.0.1:5672/%2F"}
    d.write_config()
    d.start()
    wait_for(lambda: "cancel log workq.cancel read" in d.log(), 10, what="the log read")
    names = [line.rpartition("\t")[0] for line in rabbitmqctl("list_connections", "pid", "user")
             .splitlines() if line.rpartition("\t")[2] == user]
    assert len(names) >= 2, names   # the poller's and the worker's
    for name in names:
        rabbitmqctl("close_connection", name, "cancel reader test")
    wait_for(lambda: "broker not reachable" in d.log() or "reconnecting" in d.log(), 15,
             what="the connections cut")
    mid = f"after-cut-{uuid.uuid4().hex}"
    client.cancel(mid)
    wait_for(lambda: read_by(d, mid), 20, what="read on the new connection")
    amqp.publish(qname, "n=1", message_id=mid)
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 20, what="refused")
    assert mid not in {e["id"] for e in d.ledger.events("start")}


def test_hostile_log_entries_are_ignored_and_the_daemon_keeps_working(daemon, amqp, qname,
                                                                      tmp_path):
    d = start(daemon, tmp_path, [queue_config(qname, workers=1)], log_level="debug")
    wait_for(lambda: "cancel log workq.cancel read" in d.log(), 10, what="the log read")
    before = len(d.log())   # the replay at start ignores earlier runs' hostile entries too
    tag = uuid.uuid4().hex
    ch = amqp.channel()
    bad = [pika.BasicProperties(headers={"x-test": tag}),                    # no message id
           pika.BasicProperties(message_id=f"x-{tag}", headers={cancels.H_CANCELLED_MS: "soon"}),
           pika.BasicProperties(message_id=f"y-{tag}", headers={cancels.H_CANCELLED_MS: -5}),
           pika.BasicProperties(message_id=f"z-{tag}",
                                headers={cancels.H_CANCELLED_MS: 1 << 62})]
    for props in bad:
        ch.basic_publish("", cancels.STREAM, b"\xff junk", props)
    wait_for(lambda: d.log()[before:].count("cancel log entry ignored") == len(bad), 10,
             what="each hostile entry ignored with one line")
    assert all(f"{c}-{tag}" in d.log()[before:] for c in "xyz")
    mid = amqp.publish(qname, "n=1", message_id=f"z-{tag}")
    wait_for(lambda: mid in d.ledger.ended_ids(), 20, what="a task of that id still runs")
    assert "Traceback" not in d.log()


def test_workqctl_cancel_refuses_a_bad_id_and_an_unreachable_broker(tmp_path, broker):
    cfg = tmp_path / "w.yaml"
    cfg.write_text("broker: {url: 'amqp://guest:guest@127.0.0.1:1/%2F'}\n"
                   "queues: [{name: q, handler: {python: 'taskfns:work'}}]\n")

    def run(*args):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, "-m", "workqd.ctl", "-c", str(cfg), "cancel",
                               *args], capture_output=True, text=True, env=env, timeout=60)
    r = run("x" * 256)
    assert r.returncode == 2 and "at most 255 bytes" in r.stderr
    r = run("")
    assert r.returncode == 2 and "empty" in r.stderr
    r = run("some-id")
    assert r.returncode == 3 and "cannot connect" in r.stderr


def test_how_soon_a_cancel_reaches_a_running_daemon(daemon, amqp, qname, tmp_path, client):
    """Measured from the broker's confirm of the cancel (Client.cancel returning): the
    poller reads the log at least every 0.25 s, a worker looks every 0.25 s."""
    script = tmp_path / "sleep.sh"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    d = start(daemon, tmp_path, [queue_config(qname, workers=1, timeout=120,
                                              handler={"command": [str(script)]})])
    read, stopped = [], []
    for i in range(5):
        mid = amqp.publish(qname, "x")
        wait_for(lambda: any(w["message_id"] == mid for w in status(d)["queues"][0]["workers"]),
                 20, what="the task running")
        client.cancel(mid)
        confirmed = time.monotonic()
        wait_for(lambda: read_by(d, mid), 10, interval=0.01, what="the poller read it")
        read.append(time.monotonic() - confirmed)
        wait_for(lambda: amqp.count(f"{qname}.dead") == i + 1, 10, interval=0.01,
                 what="stopped and dead-lettered")
        stopped.append(time.monotonic() - confirmed)
    print(f"\nmeasured: confirm -> poller read: {', '.join(f'{s:.3f}' for s in read)}s"
          f"\nmeasured: confirm -> command stopped, dead-lettered: "
          f"{', '.join(f'{s:.3f}' for s in stopped)}s")
    assert max(stopped) < 5, stopped   # loose: the design aims at about half a second
