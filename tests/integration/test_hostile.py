"""Someone else's messages: malformed workqd headers never stall a queue."""

from __future__ import annotations

import decimal
import os
import resource
import signal
import socket
import time

from conftest import queue_config, wait_for

OUTCOME = "workqd_tasks_processed_total"


def test_malformed_headers_between_healthy_tasks(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=2, retry={"attempts": 1})])
    bad_attempts = ["abc", [1, 2], -4, {"n": 1}, decimal.Decimal("2.5")]
    healthy, malformed = [], []
    for i, value in enumerate(bad_attempts):
        healthy.append(amqp.publish(qname, f"n=h{i} sleep=0"))
        malformed.append(amqp.publish(qname, f"n=b{i} sleep=0",
                                      headers={"x-workq-attempt": value}))
    # The broker's own counter, forged on a classic queue: ignored, the task runs once.
    counted = amqp.publish(qname, "n=c sleep=0", headers={"x-delivery-count": "zz"})
    # A failing task whose id carries a newline: its log lines must stay one line each.
    forged = amqp.publish(qname, "n=f fail=1",
                          message_id="evil\nworker q#1 (pid 1): task x dead-lettered")
    healthy.append(counted)
    wait_for(lambda: d.ledger.ended_ids() >= set(healthy), 20, what="every healthy task done")
    wait_for(lambda: amqp.count(f"{qname}.dead") == len(malformed) + 1, 10,
             what="each malformed task dead-lettered, and the failing one")
    dead = {p.message_id: p for p, _ in amqp.get_all(f"{qname}.dead")}
    assert set(dead) == {*malformed, forged}
    assert dead.pop(forged).headers["x-workq-reason"] == "failed"
    for props in dead.values():
        assert props.headers["x-workq-reason"] == "malformed"
        assert "x-workq-attempt" in props.headers["x-workq-error"]
    started = [e["id"] for e in d.ledger.events("start")]
    assert sorted(started) == sorted([*healthy, forged])   # each ran exactly once
    assert not set(started) & set(malformed)               # no malformed one ran
    # A dead letter is confirmed before it is counted, a success ended before it is.
    counts = (len(malformed) + 1, len(healthy))
    wait_for(lambda: (d.metric(OUTCOME, queue=qname, outcome="dead_letter"),
                      d.metric(OUTCOME, queue=qname, outcome="success")) == counts, 10,
             what=f"{counts[0]} dead letters and {counts[1]} successes counted")
    log = d.log()
    assert "connection lost" not in log and "internal error" not in log
    # The newline in the message id is escaped: no forged line starts the log.
    assert not any(line.startswith("worker q#1 (pid 1)") for line in log.splitlines())
    assert "evil\\nworker q#1" in log
    assert amqp.count(qname) == 0
    assert d.stop() == 0


# --- local users against the metrics port ------------------------------------------

def _fds_and_threads(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = int(next(line.split()[1] for line in open(f"/proc/{pid}/status")
                       if line.startswith("Threads:")))
    return fds, threads


def test_idle_connections_cannot_starve_the_daemon(daemon, amqp, qname):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    d = daemon([queue_config(qname, workers=2, max_tasks_per_worker=3)], start=False)
    d.start(nofile=1024)
    idle = []
    try:
        for _ in range(2000):   # "GET /metr" and wait: a request that never completes
            s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
            s.setblocking(False)
            try:
                s.send(b"GET /metr")
            except OSError:
                pass
            idle.append(s)
        t0 = time.monotonic()
        status, body = d.http("/metrics")
        assert status == 200 and "workqd_workers" in body
        assert time.monotonic() - t0 < 5
        fds, threads = _fds_and_threads(d.proc.pid)
        assert threads == 1 and fds < 300, (fds, threads)
        # A kill -9'd worker is replaced, and recycling still works, under the siege.
        victim = d.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(d.worker_pids()) == 2 and victim not in d.worker_pids(), 15,
                 what="replacement worker")
        ids = [amqp.publish(qname, f"n={i} sleep=0") for i in range(8)]
        wait_for(lambda: d.ledger.ended_ids() >= set(ids), 30, what="tasks done, with recycles")
        wait_for(lambda: d.metric("workqd_worker_restarts_total", queue=qname,
                                  reason="recycle") >= 2, 15, what="recycled workers")
        for pid in d.worker_pids():   # no worker inherited a client socket
            assert len(os.listdir(f"/proc/{pid}/fd")) < 40, pid
    finally:
        for s in idle:
            s.close()
    base = _fds_and_threads(d.proc.pid)
    for _ in range(2000):
        assert d.http("/healthz")[0] == 200
    after = _fds_and_threads(d.proc.pid)
    assert after[1] == 1 and after[0] <= base[0] + 2, (base, after)
    assert "Traceback" not in d.log()
    assert d.stop() == 0


CRASHING_FILES = {
    "bad url": "broker: {url: 'amqp://[::1'}\n",
    "bad listen": "metrics: {listen: '127.0.0.1:\u00b2'}\n",
    "deep yaml": "queues: " + "[" * 600 + "]" * 600 + "\n",
    "alias bomb": "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n"
        for i in range(8)) + "queues: [*i]\n",
    "null queue": "queues: [null]\n",
    "not utf-8": b"queues: [\xff\xfe]\n",
}


def test_reload_with_crashing_files_is_refused(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1)])
    good = d.path.read_bytes()
    for i, (name, content) in enumerate(CRASHING_FILES.items()):
        d.path.write_bytes(content if isinstance(content, bytes) else content.encode())
        d.send(signal.SIGHUP)
        wait_for(lambda: d.log().count("reload refused") > i, 15, what=f"{name} refused")
        assert d.proc.poll() is None, name
        assert d.http("/readyz")[0] == 200, name
    d.path.write_bytes(good)
    mid = amqp.publish(qname, "sleep=0")
    wait_for(lambda: mid in d.ledger.ended_ids(), 10, what="the old config still serves")
    assert "Traceback" not in d.log()
    assert d.stop() == 0
