"""The core promises, against the real broker and real processes: fair dispatch, nothing
lost to kill -9, graceful and forced stops, one clear error for a pool that cannot start."""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

from conftest import queue_config, wait_for


def _publish_all(amqp, queue, bodies):
    return [amqp.publish(queue, body) for body in bodies]


def test_round_robin_without_prefetch(daemon, amqp, qname):
    # The tutorial before fair dispatch: with prefetch 0 the broker hands out
    # deliveries in turn, so two consumers get five each of ten.
    d = daemon([queue_config(qname, workers=2, prefetch=0)])
    wait_for(lambda: amqp.channel().queue_declare(qname, passive=True).method.consumer_count == 2,
             10, what="2 consumers")
    ids = _publish_all(amqp, qname, [f"n={i} sleep=0.05" for i in range(10)])
    wait_for(lambda: d.ledger.ended_ids() >= set(ids), 20, what="10 tasks done")
    per_worker = collections.Counter(e["pid"] for e in d.ledger.events("end"))
    assert sorted(per_worker.values()) == [5, 5], per_worker


def test_fair_dispatch_long_task_does_not_hold_back_short_ones(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=2, prefetch=1)])
    long_id = amqp.publish(qname, "n=long sleep=3")
    # Give the long task a head start so it is surely running on one worker.
    wait_for(lambda: d.ledger.events("start"), 10, what="long task started")
    short_ids = _publish_all(amqp, qname, [f"n={i} sleep=0.25" for i in range(10)])
    t0 = d.ledger.events("start")[0]["t"]
    wait_for(lambda: d.ledger.ended_ids() >= {long_id, *short_ids}, 30, what="all done")
    entries = d.ledger.entries()
    long_pid = next(e["pid"] for e in entries if e["id"] == long_id)
    short_on_long_worker = [e for e in d.ledger.events("start")
                            if e["id"] in short_ids and e["pid"] == long_pid]
    # With prefetch 1 the busy worker is offered nothing while it runs the long
    # task; the other worker runs the short ones meanwhile.
    makespan = max(e["t"] for e in d.ledger.events("end")) - t0
    ideal = max((3 + 10 * 0.25) / 2, 3.0)  # max(total work / workers, longest task)
    assert len(short_on_long_worker) <= 1, short_on_long_worker
    assert makespan < ideal * 1.25, f"makespan {makespan:.2f}s vs ideal {ideal:.2f}s"


def test_kill9_mid_task_loses_nothing(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=3)])
    # The first tasks run long enough to be killed mid-task even on a loaded machine.
    ids = _publish_all(amqp, qname, [f"n={i} sleep={3 if i < 3 else 0.2}" for i in range(40)])
    first = wait_for(lambda: d.ledger.events("start"), 10, what="a task started")[0]
    victim, victim_task = first["pid"], first["id"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: d.ledger.ended_ids() >= set(ids), 40, what="all 40 tasks done")
    runs = [e for e in d.ledger.events("end") if e["id"] == victim_task]
    assert len(runs) == 1 and runs[0]["pid"] != victim and runs[0]["redelivered"], runs
    wait_for(lambda: len(d.worker_pids()) == 3 and d.metric("workqd_workers", queue=qname) == 3,
             10, what="pool back to 3")
    assert victim not in d.worker_pids()
    assert d.metric("workqd_worker_restarts_total", queue=qname, reason="crash") == 1
    assert "killed by SIGKILL while running message " + victim_task in d.log()
    assert d.stop() == 0
    assert amqp.count(qname) == 0  # nothing left ready, and nothing unacked came back


def test_long_task_survives_short_heartbeat(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1)], heartbeat=2)
    mid = amqp.publish(qname, "sleep=10")
    wait_for(lambda: mid in d.ledger.ended_ids(), 20, what="10 s task done")
    wait_for(lambda: d.metric("workqd_tasks_processed_total", queue=qname, outcome="success") == 1,
             5, what="success counted")
    assert len(d.ledger.events("start")) == 1  # one delivery: heartbeats kept the connection
    assert d.stop() == 0
    assert amqp.count(qname) == 0  # acked exactly once, nothing came back
    assert "connection lost" not in d.log()


def test_graceful_stop_finishes_running_tasks(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=3)], shutdown_timeout=10)
    ids = _publish_all(amqp, qname, ["sleep=1.5"] * 3)
    wait_for(lambda: len(d.ledger.events("start")) == 3, 10, what="3 tasks running")
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 10
    assert d.ledger.ended_ids() == set(ids)
    assert amqp.count(qname) == 0


def test_task_longer_than_shutdown_timeout_is_cut_and_redelivered(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1)], shutdown_timeout=1)
    mid = amqp.publish(qname, "sleep=4")
    wait_for(lambda: d.ledger.events("start"), 10, what="task started")
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 4
    assert mid not in d.ledger.ended_ids()
    wait_for(lambda: amqp.count(qname) == 1, 5, what="task back on the queue")
    d2 = daemon([queue_config(qname, workers=1)])
    wait_for(lambda: mid in d2.ledger.ended_ids(), 15, what="redelivered task done")
    assert [e["redelivered"] for e in d2.ledger.events("end") if e["id"] == mid] == [True]


def test_second_term_stops_at_once(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1)], shutdown_timeout=30)
    mid = amqp.publish(qname, "sleep=20")
    wait_for(lambda: d.ledger.events("start"), 10, what="task started")
    d.send(signal.SIGTERM)
    wait_for(lambda: "stopping" in d.log(), 5, what="stop begun")
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM, timeout=10) == 0
    assert time.monotonic() - t0 < 5
    assert mid not in d.ledger.ended_ids()
    wait_for(lambda: amqp.count(qname) == 1, 5, what="the cut task requeued")


def test_pool_stops_with_error_when_handler_cannot_load(daemon, qname):
    d = daemon([queue_config(qname, handler={"python": "no_such_module:run"})], start=False)
    d.start(wait_ready=False)
    assert d.proc.wait(20) == 1
    log = d.log()
    assert "cannot load handler no_such_module:run" in log
    assert "cannot stay up" in log
    assert "Traceback" not in log


def test_pool_stops_with_error_when_broker_refuses_login(daemon, qname):
    d = daemon([queue_config(qname)], start=False)
    d.config["broker"]["url"] = "amqp://guest:wrong@127.0.0.1:5672/%2F"
    d.write_config()
    d.start(wait_ready=False)
    assert d.proc.wait(20) == 1
    assert "refused the login" in d.log()


def test_queue_declared_with_other_arguments_is_a_clear_error(daemon, amqp, qname):
    amqp.declare(qname, "classic")
    d = daemon([queue_config(qname, type="quorum")], start=False)
    d.start(wait_ready=False)
    assert d.proc.wait(20) == 1
    assert "exists on the broker with other arguments" in d.log()


def test_command_handler_gets_body_and_environment(daemon, amqp, qname, tmp_path):
    out = tmp_path / "cmd.out"
    script = tmp_path / "handler.sh"
    script.write_text(f"#!/bin/sh\n{{ cat; echo; echo \"$WORKQ_MESSAGE_ID $WORKQ_QUEUE "
                      f"$WORKQ_REDELIVERED $WORKQ_DELIVERY_COUNT\"; }} >> {out}\n"
                      f"echo hello from the handler\n")
    script.chmod(0o755)
    d = daemon([queue_config(qname, workers=1, handler={"command": [str(script)]})])
    mid = amqp.publish(qname, "the body")
    wait_for(lambda: d.metric("workqd_tasks_processed_total", queue=qname, outcome="success") == 1,
             10, what="command task done")
    assert out.read_text() == f"the body\n{mid} {qname} 0 0\n"
    assert f"task {mid} stdout: hello from the handler" in d.log()


def test_failing_command_is_dead_lettered_with_reason(daemon, amqp, qname, tmp_path):
    script = tmp_path / "fail.sh"
    script.write_text("#!/bin/sh\necho 'disk full' >&2\nexit 3\n")
    script.chmod(0o755)
    d = daemon([queue_config(qname, workers=1, handler={"command": [str(script)]})])
    mid = amqp.publish(qname, "x")
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 10, what="dead-lettered")
    (props, body), = amqp.get_all(f"{qname}.dead")
    assert body == b"x" and props.message_id == mid
    assert props.headers["x-workq-reason"] == "failed"
    assert "exit status 3: disk full" in props.headers["x-workq-error"]
    assert d.metric("workqd_tasks_processed_total", queue=qname, outcome="dead_letter") == 1
    assert amqp.count(qname) == 0


def test_a_python_handler_that_calls_sys_exit_fails_its_task_and_its_worker_stays(
        daemon, amqp, qname):
    # The timeout is far away: the task must not wait for it to be settled.
    d = daemon([queue_config(qname, workers=1, timeout=600, handler={"python": "taskfns:exits"},
                             retry={"attempts": 2, "backoff": [1]})])
    pids = d.worker_pids()
    mid = amqp.publish(qname, "status=3")
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 30, what="dead-lettered after two tries")
    (props, _), = amqp.get_all(f"{qname}.dead")
    assert props.message_id == mid and props.headers["x-workq-error"] == "SystemExit: 3"
    assert [e["attempt"] for e in d.ledger.events("start")] == [1, 2]
    assert d.worker_pids() == pids
    assert "its handler raised SystemExit: 3, which ends the task, not the worker" in d.log()


def test_prefetch_above_one_coalesces_acks_without_losing_failures(daemon, amqp, qname):
    # Successes share multiple-acks; a failure between them is dead-lettered and
    # must be acked on its own, only once its copy is confirmed.
    # The first half succeeds in a row (coalesced acks), the second mixes in failures.
    # All are queued before the workers start, so each gets a full prefetch at once and
    # completes several tasks per loop turn (published one by one to running workers,
    # the tasks would arrive no faster than they run, and be acked one by one).
    bodies = [("fail=1" if i >= 150 and i % 7 == 3 else "sleep=0") + f" n={i}"
              for i in range(300)]
    amqp.declare(qname, "classic")
    ids = [amqp.publish(qname, b) for b in bodies]
    d = daemon([queue_config(qname, workers=2, prefetch=20)], log_level="debug")
    failing = {mid for mid, b in zip(ids, bodies) if b.startswith("fail")}
    wait_for(lambda: d.metric("workqd_tasks_processed_total", queue=qname) == 300, 30,
             what="300 tasks settled")
    assert d.metric("workqd_tasks_processed_total", queue=qname, outcome="success") == 300 - len(failing)
    assert d.ledger.ended_ids() == set(ids) - failing
    assert d.stop() == 0
    assert amqp.count(qname) == 0  # every delivery was acked exactly once: nothing came back
    assert {p.message_id for p, _ in amqp.get_all(f"{qname}.dead")} == failing
    assert "redelivered" not in d.log()
    coalesced = [int(w) for line in d.log().splitlines() if "in one frame" in line
                 for w in line.split("acked ", 1)[1].split()[:1]]
    assert coalesced and max(coalesced) > 1, "no multiple-ack covered several successes"



def _thread_io(pid: int) -> dict[int, tuple[int, int]]:
    """(read, write) system calls so far, per thread of ``pid``. Linux counts read(2) and
    write(2) here, not a socket's send or recv: for a worker, that is its wake-up eventfd."""
    counts = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = dict(line.split(": ") for line in (task / "io").read_text().splitlines())
        counts[int(task.name)] = (int(fields["syscr"]), int(fields["syscw"]))
    return counts


def _wakeups_per_task(daemon, amqp, qname, tasks: int, **queue) -> tuple[float, float]:
    """Drain ``tasks`` no-op tasks through one worker at prefetch 1: (eventfd reads of the
    connection's thread, eventfd writes of the other threads) per task."""
    d = daemon([queue_config(qname, workers=1, handler={"python": "workqd.handlers:noop"},
                             **queue)])
    wait_for(lambda: amqp.channel().queue_declare(qname, passive=True).method.consumer_count == 1,
             10, what="the worker consuming")
    worker, = d.worker_pids()
    before = _thread_io(worker)
    for i in range(tasks):
        amqp.publish(qname, f"n={i}")
    wait_for(lambda: d.metric("workqd_tasks_processed_total", queue=qname, outcome="success")
             == tasks, 60, what=f"{tasks} tasks done")
    after = _thread_io(worker)
    assert amqp.count(qname) == 0
    assert d.stop() == 0
    reads = after[worker][0] - before[worker][0]   # the main thread runs the connection
    writes = sum(w - before.get(tid, (0, 0))[1] for tid, (_, w) in after.items() if tid != worker)
    return reads / tasks, writes / tasks


def test_at_prefetch_one_the_handler_thread_acks_without_waking_the_connection(
        daemon, amqp, qname):
    # A success at prefetch 1 is acked by the thread that ran it: the connection's thread
    # is not woken for it. Were that path silently off (a pika whose transport no longer
    # looks as expected), every other test would still pass, only slower. At prefetch 1
    # the broker sends the next task only after the ack, so the tasks getting done at
    # all, with no wake-up, means the handler thread sent the acks.
    # A queue with limits asks to hear of every result: the contrast shows what is counted.
    tasks = 200
    quiet = _wakeups_per_task(daemon, amqp, qname, tasks)
    limited = f"{qname}.limited"
    try:
        woken = _wakeups_per_task(daemon, amqp, limited, tasks, limits={"concurrency": 5})
    finally:
        amqp.delete(limited, f"{limited}.dead")
    assert quiet[0] < 0.1 and quiet[1] < 0.1, (quiet, woken)
    print(f"\nwake-ups per task, quiet {quiet}, with limits {woken}")
    # About one each; fewer on a loaded machine, where a result that comes while the
    # last wake-up is still unread rides on it (0.85 seen in a full run beside others).
    assert woken[0] >= 0.5 and woken[1] >= 0.5, (quiet, woken)
