"""Metrics and health endpoints, scraped over HTTP from a real daemon."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from conftest import free_port, queue_config, wait_for
from polling import SCALE

SUCCESS = "workqd_tasks_processed_total"


def test_counts_stay_true_when_a_busy_worker_is_killed(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=2)])
    ids = [amqp.publish(qname, f"n={i} sleep=0.4") for i in range(20)]
    busy = wait_for(lambda: d.ledger.events("start"), 10, what="a task running")[0]["pid"]
    os.kill(busy, signal.SIGKILL)
    wait_for(lambda: d.ledger.ended_ids() >= set(ids), 40, what="all 20 done")
    wait_for(lambda: d.metric(SUCCESS, queue=qname, outcome="success") == 20, 5,
             what="20 successes counted")
    wait_for(lambda: d.metric("workqd_workers", queue=qname) == 2
             and d.metric("workqd_workers", queue=qname, state="idle") == 2, 10,
             what="2 idle workers")
    m = d.metrics()
    q = f'queue="{qname}"'
    assert m[f'{SUCCESS}{{outcome="success",{q}}}'] == 20
    assert m[f"workqd_tasks_redelivered_total{{{q}}}"] >= 1
    assert m[f"workqd_tasks_in_flight{{{q}}}"] == 0
    assert m[f'workqd_worker_restarts_total{{{q},reason="crash"}}'] >= 1
    assert m[f"workqd_task_duration_seconds_count{{{q}}}"] == 20
    # 0.4 s tasks: none in a bucket below 0.4 s, all by +Inf. How far above 0.4 s each
    # lands is the machine's load (one 0.4 s sleep took over 0.5 s in a loaded CI run).
    assert m[f'workqd_task_duration_seconds_bucket{{le="0.25",{q}}}'] == 0
    assert m[f'workqd_task_duration_seconds_bucket{{le="+Inf",{q}}}'] == 20
    assert m[f"workqd_task_duration_seconds_sum{{{q}}}"] >= 20 * 0.4
    assert m["workqd_broker_connected"] == 1
    assert m['workqd_build_info{version="0.1.0"}'] == 1
    # Polled every 5 s: wait for a sample taken after the queue drained.
    wait_for(lambda: d.metric("workqd_queue_consumers", queue=qname) == 2
             and d.metric("workqd_queue_messages_ready", queue=qname) == 0, 15,
             what="queue consumers and an empty queue polled")


def test_in_flight_while_running_and_gauges_after_reload(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=2)])
    mid = amqp.publish(qname, "sleep=3")
    wait_for(lambda: d.metric("workqd_tasks_in_flight", queue=qname) == 1, 10, what="in flight 1")
    assert d.metric("workqd_workers", queue=qname, state="busy") == 1
    # Reload with 3 workers while the task runs: it completes once, gauges follow.
    d.config["queues"][0]["workers"] = 3
    d.write_config()
    d.send(signal.SIGHUP)
    wait_for(lambda: mid in d.ledger.ended_ids(), 10, what="task across reload done")
    wait_for(lambda: d.metric("workqd_workers", queue=qname) == 3
             and d.metric("workqd_workers", queue=qname, state="idle") == 3
             and len(d.worker_pids()) == 3, 15, what="3 idle workers after reload")
    assert d.metric("workqd_tasks_in_flight", queue=qname) == 0
    assert d.metric(SUCCESS, queue=qname, outcome="success") == 1
    assert len(d.ledger.events("start")) == 1
    assert d.metric("workqd_worker_restarts_total", queue=qname, reason="reload") == 2


def test_readyz_before_consuming_while_draining_and_healthz(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1)], start=False)
    d.config["broker"]["url"] = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    d.write_config()
    d.start(wait_ready=False)
    wait_for(lambda: d.http("/healthz")[0] == 200, 10, what="healthz up")
    wait_for(lambda: "connection" in d.log() or "cannot connect" in d.log(), 10,
             what="worker retrying")
    status, body = d.http("/readyz")
    assert status == 503 and "no worker is consuming" in body
    assert d.metric("workqd_broker_connected") == 0
    assert d.metric("workqd_workers", queue=qname, state="starting") == 1
    assert d.stop() == 0

    d2 = daemon([queue_config(qname, workers=1)])  # waits for /readyz 200
    assert d2.http("/readyz") == (200, "ready\n")
    mid = amqp.publish(qname, "sleep=2")
    wait_for(lambda: d2.ledger.events("start"), 10, what="task started")
    d2.send(signal.SIGTERM)
    status, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(d2.http("/readyz")),
                            5, what="readyz 503 while draining")
    assert "draining" in body
    assert d2.http("/healthz")[0] == 200
    assert d2.proc.wait(15) == 0
    assert mid in d2.ledger.ended_ids()


def test_port_in_use_is_a_clear_startup_error(daemon, qname):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        d = daemon([queue_config(qname)], start=False)
        d.config["metrics"]["listen"] = f"127.0.0.1:{s.getsockname()[1]}"
        d.write_config()
        d.start(wait_ready=False)
        assert d.proc.wait(15) == 1
    assert "address already in use" in d.log() and "Traceback" not in d.log()


def _master_footprint(pid: int) -> tuple[int, int]:
    """RSS (KiB) and open fds of the master; the least of a few samples over a second,
    since the queue poller briefly holds a connection every few seconds."""
    samples = []
    for _ in range(6):
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
                   .splitlines() if line.startswith("VmRSS:"))
        samples.append((rss, len(os.listdir(f"/proc/{pid}/fd"))))
        time.sleep(0.2)
    return min(s[0] for s in samples), min(s[1] for s in samples)


def test_hundred_restarts_keep_counters_and_nothing_grows(daemon, amqp, qname, capsys):
    # Every worker recycles after 2 tasks, and a chaos loop kill -9s workers:
    # well over 100 worker restarts under load. A requeued task goes back to the head
    # of the queue, so on a slow machine the next kill often lands on the worker that
    # took it again: with the default max_redeliveries (3) the daemon rightly
    # dead-letters it as poison and it never ends. Above the kills, none can be poison.
    kill_budget = 40
    d = daemon([queue_config(qname, workers=2, max_tasks_per_worker=2,
                             max_redeliveries=kill_budget + 1)])
    rss0, fds0 = _master_footprint(d.proc.pid)
    ids = [amqp.publish(qname, f"n={i} sleep=0.01") for i in range(200)]
    rng = random.Random(7)
    seen: dict[str, float] = {}
    kills = 0
    # The run fails when it stops making progress, not when a loaded machine makes it
    # slow: a minute (stretched like every wait) without one more task ending.
    stall = 60 * SCALE
    done, progress_at = 0, time.monotonic()
    while not (ended := d.ledger.ended_ids()) >= set(ids):
        if len(ended) > done:
            done, progress_at = len(ended), time.monotonic()
        assert time.monotonic() - progress_at < stall, \
            f"no task ended for {stall:g} s ({done} of 200 ended, {kills} kill -9)"
        pids = d.worker_pids()
        if pids and kills < kill_budget:
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        for key, value in d.metrics().items():  # counters never go backwards
            if "_total" in key or key.endswith("_count") or "_bucket" in key:
                assert value >= seen.get(key, 0), f"{key} went back {seen.get(key)} -> {value}"
                seen[key] = value
        time.sleep(0.05)
    # Every task settled at least once, counted by workers most of which are dead
    # by now. A kill that lands after a handler returned makes the broker run the
    # task again (at-least-once): such a run shows in the ledger, and in the
    # counter only if its settlement was recorded before the kill.
    runs = len(d.ledger.events("end"))
    wait_for(lambda: d.metric(SUCCESS, queue=qname, outcome="success") >= 200, 10,
             what="200 successes counted")
    success = d.metric(SUCCESS, queue=qname, outcome="success")
    assert 200 <= success <= runs <= 200 + kills, (success, runs, kills)
    restarts = (d.metric("workqd_worker_restarts_total", queue=qname, reason="crash")
                + d.metric("workqd_worker_restarts_total", queue=qname, reason="recycle"))
    assert restarts >= 100, restarts
    wait_for(lambda: d.metric("workqd_workers", queue=qname) == 2
             and len(d.worker_pids()) == 2, 10, what="pool of 2")
    assert d.metric("workqd_task_duration_seconds_count", queue=qname) == success
    assert d.metric("workqd_tasks_in_flight", queue=qname) == 0
    rss1, fds1 = _master_footprint(d.proc.pid)
    assert fds1 == fds0, (fds0, fds1)
    # The master's memory must not scale with restarts (allow allocator noise).
    assert rss1 - rss0 < 4096, (rss0, rss1)
    with capsys.disabled():
        print(f"\n[metrics churn] {int(restarts)} restarts ({kills} kill -9), {runs} runs of "
              f"200 tasks, master RSS "
              f"{rss0} -> {rss1} KiB, fds {fds0} -> {fds1}")


def test_the_test_rig_starts_a_daemon_again_when_its_picked_port_was_taken(daemon, qname):
    # The rig picks a free port, then the daemon binds it: another process can take it
    # in between. The daemon then exits with its one clear line (above), and the rig
    # starts it again on another port rather than failing an unrelated test.
    import socket
    d = daemon([queue_config(qname)], start=False)
    taken = d.port
    with socket.socket() as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        d.start()
        assert d.port != taken and d.http("/readyz")[0] == 200
    assert "address already in use" not in d.log()
