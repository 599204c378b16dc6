"""Fault injection: retries, dead letters, poison, timeouts, recycling, chaos.

Every execution lands in the ledger (tests/taskfns.py), so each test can say
exactly how often what ran, where, and whether it completed.
"""

from __future__ import annotations

import collections
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BROKER_URL, Amqp, queue_config, wait_for
from .test_broker_loss import rabbitmqctl

OUTCOME = "workqd_tasks_processed_total"


def test_retries_with_backoff_then_dead_letter(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=2, retry={"attempts": 3, "backoff": [1, 1]})])
    mid = amqp.publish(qname, "fail=1")
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 20, what="dead-lettered")
    fails = d.ledger.events("fail")
    assert [f["attempt"] for f in fails] == [1, 2, 3]
    starts = [e["t"] for e in d.ledger.events("start")]
    assert all(b - a >= 1.0 for a, b in zip(starts, starts[1:])), starts  # backoff respected
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 5,
             what="dead_letter counted")
    assert d.metric(OUTCOME, queue=qname, outcome="retry") == 2
    assert d.metric(OUTCOME, queue=qname, outcome="success") == 0
    (props, body), = amqp.get_all(f"{qname}.dead")
    h = props.headers
    assert body == b"fail=1" and props.message_id == mid
    assert h["x-workq-reason"] == "failed" and h["x-workq-attempt"] == 3
    assert "failed on purpose" in h["x-workq-error"] and h["x-workq-queue"] == qname
    assert h["x-workq-dead-at"].endswith("+00:00")
    assert amqp.count(qname) == 0


def test_exponential_backoff_with_jitter_spreads_the_retries(daemon, amqp, qname):
    # 40 tasks fail at once (one outage); their second tries must not come back together.
    # initial 2 s, jitter 0.5: try 2 waits 1.0, 1.3, 1.7 or 2.0 s; the delay levels count
    # whole seconds, rounded up so that none comes back early: 1 s or 2 s.
    d = daemon([queue_config(qname, workers=4, retry={
        "attempts": 2, "backoff": {"initial": 2, "jitter": 0.5}})])
    ids = [amqp.publish(qname, f"n={i} fail=1") for i in range(40)]
    wait_for(lambda: amqp.count(f"{qname}.dead") == 40, 30, what="all 40 dead-lettered")
    for props, _ in amqp.get_all(f"{qname}.dead"):
        assert props.headers["x-workq-attempt"] == 2
    fails = {}
    for e in d.ledger.events("fail"):
        fails.setdefault(e["id"], []).append(e["t"])
    assert set(fails) == set(ids) and all(len(t) == 2 for t in fails.values())
    waits = sorted(b - a for a, b in fails.values())
    assert waits[0] >= 1.0 - 0.05, waits   # nobody came back before the shortest step
    short = sum(1 for w in waits if w < 1.5)
    # A quarter of the tasks draw the 1.0 s step: P(none of 40) = 0.75**40, about 1e-5.
    assert 0 < short < 40, waits
    print(f"[jitter] second tries after ~1 s: {short}, after ~2 s: {40 - short}; "
          f"waits {waits[0]:.2f}..{waits[-1]:.2f} s")


def test_a_retry_that_succeeds_is_a_success(daemon, amqp, qname, tmp_path):
    marker = tmp_path / "second-time"
    script = tmp_path / "flaky.sh"
    script.write_text(f"#!/bin/sh\n[ -e {marker} ] && exit 0\ntouch {marker}\nexit 1\n")
    script.chmod(0o755)
    d = daemon([queue_config(qname, workers=1, handler={"command": [str(script)]},
                             retry={"attempts": 2, "backoff": [0]})])
    amqp.publish(qname, "x")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 1, 15, what="success")
    assert d.metric(OUTCOME, queue=qname, outcome="retry") == 1
    assert amqp.count(f"{qname}.dead") == 0


@pytest.mark.parametrize("qtype", ["classic", "quorum"])
def test_poison_task_is_dead_lettered_after_max_redeliveries(daemon, amqp, qname, qtype):
    d = daemon([queue_config(qname, workers=2, type=qtype, max_redeliveries=3)])
    before = [amqp.publish(qname, f"n=a{i} sleep=0.05") for i in range(5)]
    poison = amqp.publish(qname, "die=1")
    after = [amqp.publish(qname, f"n=b{i} sleep=0.05") for i in range(5)]
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 30, what="poison dead-lettered")
    wait_for(lambda: d.ledger.ended_ids() >= set(before + after), 20, what="healthy tasks done")
    runs = [e for e in d.ledger.events("start") if e["id"] == poison]
    assert len(runs) == 3, runs  # it killed exactly max_redeliveries workers, then no more
    (props, _), = amqp.get_all(f"{qname}.dead")
    assert props.message_id == poison and props.headers["x-workq-reason"] == "poison"
    wait_for(lambda: d.http("/readyz")[0] == 200 and len(d.worker_pids()) == 2, 10,
             what="daemon ready with 2 workers")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 10,
             what="the poison task counted")
    assert d.metric("workqd_worker_restarts_total", queue=qname, reason="crash") == 3
    assert "it is poison" in d.log()


def test_poison_with_a_long_non_ascii_id_is_counted_by_its_whole_id(daemon, amqp, qname):
    """Deaths count by a digest of the whole id: a long id with a character across the
    bytes a slot shows, and a sibling whose id shares those bytes, count apart."""
    head = "p" * 119 + "é"                       # 'é' is bytes 119 and 120
    poison = head + "ü" * 61 + "-poison"         # 250 bytes: AMQP's message_id holds 255
    sibling = head + "ü" * 61 + "-healthy"
    assert len(poison.encode()) == 250
    d = daemon([queue_config(qname, workers=2, type="classic", max_redeliveries=3)])
    amqp.publish(qname, "die=1", message_id=poison)
    amqp.publish(qname, "n=1", message_id=sibling)
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 30, what="poison dead-lettered")
    wait_for(lambda: sibling in d.ledger.ended_ids(), 10, what="the sibling task done")
    runs = [e for e in d.ledger.events("start") if e["id"] == poison]
    assert len(runs) == 3, runs   # three deaths, then dead-lettered unrun
    (props, body), = amqp.get_all(f"{qname}.dead")
    assert (props.message_id, body) == (poison, b"die=1")
    assert props.headers["x-workq-reason"] == "poison"
    assert d.metric("workqd_worker_restarts_total", queue=qname, reason="crash") == 3
    assert "p" * 119 + "…" in d.log()   # the dead holder is named by the prefix it showed


def _tree_alive(pid_file: Path) -> list[int]:
    if not pid_file.exists():
        return []
    alive = []
    for pid in map(int, pid_file.read_text().split()):
        try:  # a zombie is dead: it only waits for its parent to reap it
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def test_command_timeout_kills_the_process_tree(daemon, amqp, qname, tmp_path):
    pids = tmp_path / "pids"
    script = tmp_path / "slow.sh"
    # The handler starts a grandchild too: the whole tree must go.
    script.write_text(f"#!/bin/sh\nsleep 60 &\necho $$ $! > {pids}\nwait\n")
    script.chmod(0o755)
    d = daemon([queue_config(qname, workers=1, timeout=2, handler={"command": [str(script)]},
                             retry={"attempts": 1})])
    amqp.publish(qname, "x")
    wait_for(lambda: len(_tree_alive(pids)) == 2, 10, what="handler and grandchild running")
    started = pids.stat().st_mtime
    wait_for(lambda: not _tree_alive(pids), 5, what="process tree gone")
    assert time.time() - started < 2 + 1.5
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="timeout") == 1, 5,
             what="timeout counted")
    (props, _), = amqp.get_all(f"{qname}.dead")
    assert props.headers["x-workq-reason"] == "timeout"


def test_python_timeout_settles_the_task_and_recycles_the_worker(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1, timeout=1, retry={"attempts": 2, "backoff": [0]})])
    amqp.publish(qname, "sleep=30")
    first = wait_for(lambda: d.ledger.events("start"), 10, what="task started")[0]
    # Try 1 times out, the worker leaves; try 2 runs on its replacement and times out too.
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 15, what="dead-lettered after 2 tries")
    starts = d.ledger.events("start")
    assert [s["attempt"] for s in starts] == [1, 2]
    assert starts[1]["pid"] != first["pid"]
    # The dead letter is published before the outcome is counted in the worker's slot.
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="timeout") == 2, 10,
             what="2 timeout outcomes")
    wait_for(lambda: d.metric("workqd_worker_restarts_total", queue=qname, reason="timeout") == 2,
             5, what="2 timeout restarts")
    wait_for(lambda: len(d.worker_pids()) == 1, 5, what="pool back to 1")


def _sample_capacity(d, qname, n, stop_when, timeout):
    """Poll the worker gauges until ``stop_when()``; return the smallest idle+busy seen."""
    lowest = n
    deadline = time.monotonic() + timeout
    while not stop_when():
        assert time.monotonic() < deadline, "timed out"
        m = d.metrics()
        busy = m.get(f'workqd_workers{{queue="{qname}",state="busy"}}', 0)
        idle = m.get(f'workqd_workers{{queue="{qname}",state="idle"}}', 0)
        lowest = min(lowest, busy + idle)
        time.sleep(0.02)
    return lowest


def _task_seconds_outlasting_a_start(d) -> float:
    """How long a task must last to outlast a replacement worker's start here.

    A recycling worker's replacement starts when it takes its last task, so that task
    must outlast a worker's start (a fork, a connect and the declarations) for the pool
    to stay full. That is well under a second on a quiet machine; CI also runs this suite
    inside a container on a loaded one, where 2 s proved too little. So a task lasts four
    times what this pool's own start took here, and at least 2 s."""
    started = wait_for(lambda: re.search(
        r"ready: every worker is consuming \((\d+\.\d+)s after start\)", d.log()), 30,
        what="the master's line on its start")
    return max(2.0, 4 * float(started.group(1)))


def test_recycling_by_task_count_keeps_the_pool_full(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=2, max_tasks_per_worker=3)])
    task_s = _task_seconds_outlasting_a_start(d)
    ids = [amqp.publish(qname, f"n={i} sleep={task_s:.2f}") for i in range(12)]
    lowest = _sample_capacity(d, qname, 2, lambda: d.ledger.ended_ids() >= set(ids),
                              60 + 6 * task_s)
    assert lowest >= 2, f"capacity dipped to {lowest} with {task_s:.2f} s tasks:\n{d.log()}"
    wait_for(lambda: d.metric("workqd_worker_restarts_total", queue=qname, reason="recycle") >= 3,
             10, what="recycles counted")
    per_pid = collections.Counter(e["pid"] for e in d.ledger.events("end"))
    assert max(per_pid.values()) <= 3, per_pid
    assert d.metric(OUTCOME, queue=qname, outcome="success") == 12


def test_recycling_by_memory_keeps_the_pool_full(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=2, max_memory_per_worker="150MiB")])
    # A worker sees it is past the limit as it takes a task, which becomes its last.
    task_s = _task_seconds_outlasting_a_start(d)
    ids = [amqp.publish(qname, f"n={i} leak=40 sleep={task_s:.2f}") for i in range(12)]
    lowest = _sample_capacity(d, qname, 2, lambda: d.ledger.ended_ids() >= set(ids),
                              60 + 6 * task_s)
    assert lowest >= 2, f"capacity dipped to {lowest} with {task_s:.2f} s tasks:\n{d.log()}"
    wait_for(lambda: d.metric("workqd_worker_restarts_total", queue=qname, reason="recycle") >= 2,
             10, what="memory recycles counted")
    assert "past max_memory_per_worker" in d.log()


def test_hostile_messages_never_crash_a_worker(daemon, amqp, qname, tmp_path):
    script = tmp_path / "cat.sh"
    script.write_text("#!/bin/sh\nhead -c 3000000 /dev/zero | tr '\\0' 'x' | fold -w 100\n"
                      "cat > /dev/null\n")
    script.chmod(0o755)
    d = daemon([queue_config(qname, workers=1, handler={"command": [str(script)]},
                             max_body="1MiB")])
    ch = amqp.channel()
    import pika
    ch.basic_publish("", qname, b"\xff\xfe not utf-8 \x00", pika.BasicProperties())  # no props
    big = amqp.publish(qname, b"x" * (2 << 20))
    ok = amqp.publish(qname, "fine")
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 20, what="big body dead-lettered")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 2, 20,
             what="the other two done (megabytes of output did not block)")
    (props, _), = amqp.get_all(f"{qname}.dead")
    assert props.message_id == big and props.headers["x-workq-reason"] == "too-large"
    assert d.metric("workqd_worker_restarts_total", queue=qname, reason="crash") == 0
    assert f"task {ok} stdout: (" in d.log()  # output past the logged lines is counted


@pytest.mark.broker_outage   # cuts every connection on the machine's broker
def test_soak_chaos_loses_nothing(daemon, qname, capsys):
    amqp = Amqp()
    n = 5000
    # A high poison limit: chaos kills are not the task's fault.
    d = daemon([queue_config(qname, workers=4, type="quorum", max_redeliveries=50)], start=False)
    amqp.declare(qname, "quorum")
    ids = [amqp.publish(qname, f"n={i} sleep=0.01") for i in range(n)]
    amqp.close()
    d.start()
    rng = random.Random(42)
    kills = cuts = 0
    next_cut = time.monotonic() + 5
    deadline = time.monotonic() + 240
    while not d.ledger.ended_ids() >= set(ids):
        assert time.monotonic() < deadline, f"{len(d.ledger.ended_ids())}/{n} done"
        pids = d.worker_pids()
        if pids:
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        if time.monotonic() >= next_cut:
            rabbitmqctl("close_all_connections", "chaos test")
            cuts += 1
            next_cut = time.monotonic() + 5
        time.sleep(0.3)
    ends = d.ledger.events("end")
    runs = collections.Counter(e["id"] for e in ends)
    duplicates = sum(c - 1 for c in runs.values())
    # A duplicate is a task whose ack was lost to a kill or a cut: its later run
    # came as a redelivery.
    for mid, count in runs.items():
        if count > 1:
            redelivered = sum(1 for e in ends if e["id"] == mid and e["redelivered"])
            assert redelivered >= count - 1, mid
    assert set(runs) == set(ids)  # 0 lost
    d.wait_ready(timeout=30)
    assert d.stop() == 0
    amqp = Amqp()
    assert amqp.count(qname) == 0 and amqp.count(f"{qname}.dead") == 0
    amqp.close()
    with capsys.disabled():
        print(f"\n[soak] {n} tasks, {kills} kill -9, {cuts} connection cuts: 0 lost, "
              f"{duplicates} duplicate runs (each a redelivery)")


def test_requeue_dead_moves_tasks_back_for_a_fresh_try(daemon, amqp, qname, tmp_path):
    flag = tmp_path / "fixed"
    runs = tmp_path / "runs"
    script = tmp_path / "h.sh"
    # Fails until the operator "fixes" it; then records which try each task is on.
    script.write_text(f"#!/bin/sh\n[ -e {flag} ] || exit 1\n"
                      f"echo \"$WORKQ_MESSAGE_ID $WORKQ_ATTEMPT\" >> {runs}\n")
    script.chmod(0o755)
    d = daemon([queue_config(qname, workers=1, handler={"command": [str(script)]},
                             retry={"attempts": 2, "backoff": [0]})])
    ids = [amqp.publish(qname, f"t{i}") for i in range(3)]
    wait_for(lambda: amqp.count(f"{qname}.dead") == 3, 15, what="3 dead-lettered")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 3, 5,
             what="3 dead letters counted")
    assert d.metric(OUTCOME, queue=qname, outcome="retry") == 3   # each died on try 2 of 2
    flag.touch()
    r = subprocess.run([sys.executable, "-m", "workqd.submit", "--url", BROKER_URL,
                        "--requeue-dead", qname], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "moved 3 task(s)" in r.stderr, r.stderr
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 3, 15,
             what="requeued tasks succeed")
    assert amqp.count(f"{qname}.dead") == 0
    # Each came back once, as a fresh first try, not as attempt 2 of the old count.
    assert sorted(runs.read_text().split("\n")[:-1]) == sorted(f"{i} 1" for i in ids)
