"""The worker's clock against the real broker and daemon: retries through the shared
delay levels, expired tasks, tasks that arrive before they are due, and many delayed
tasks that must each run no earlier than due and none lost.
"""

from __future__ import annotations

import random
import time

from conftest import BROKER_URL, queue_config, wait_for
from workqd import delays
from workqd.client import Client

OUTCOME = "workqd_tasks_processed_total"


def test_ten_retries_through_the_same_level_on_a_quorum_queue_all_arrive(daemon, amqp, qname):
    # Every retry waits in the same 1 s level. RabbitMQ drops a message dead-lettered
    # into a queue it was dead-lettered from before (cycle detection); the copies leave
    # their history behind, so the eleventh try comes as surely as the second.
    d = daemon([queue_config(qname, type="quorum", handler={"python": "timefns:flaky"},
                             retry={"attempts": 11, "backoff": [1]})])
    mid = amqp.publish(qname, "until=11")
    wait_for(lambda: d.ledger.events("end"), 60, what=lambda: f"the eleventh try; log:\n{d.log()[-3000:]}")
    starts = d.ledger.events("start")
    assert [e["attempt"] for e in starts] == list(range(1, 12))
    assert {e["id"] for e in starts} == {mid}
    gaps = [b["t"] - a["t"] for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 1.0, gaps   # the backoff is waited out every time
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 1, 5,
             what="the success counted")
    assert d.metric(OUTCOME, queue=qname, outcome="retry") == 10
    assert amqp.count(f"{qname}.dead") == 0
    # No queue per delay any more.
    assert amqp.count(f"{qname}.delay.1s") == -1
    print(f"[levels] 10 retries with backoff 1 s: gaps {min(gaps):.2f}..{max(gaps):.2f} s")


def test_a_task_delivered_after_its_deadline_is_dead_lettered_unrun(daemon, amqp, qname):
    amqp.declare(qname, "classic")
    with Client(BROKER_URL) as client:
        mid = client.submit(b"n=1", queue=qname, expires=1)
    # The daemon is absent until the task's deadline has passed.
    deadline = time.time() + 1.2
    while time.time() < deadline:
        time.sleep(deadline - time.time())
    d = daemon([queue_config(qname)])
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 15, what="dead-lettered")
    (props, body), = amqp.get_all(f"{qname}.dead")
    assert props.message_id == mid and body == b"n=1"
    assert props.headers["x-workq-reason"] == "expired"
    assert "after its deadline" in props.headers["x-workq-error"]
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="expired") == 1, 5,
             what="outcome expired counted")
    assert d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 0
    assert d.ledger.events("start") == []
    # A task whose deadline is still ahead runs.
    with Client(BROKER_URL) as client:
        fresh = client.submit(b"n=2", queue=qname, expires=60)
    wait_for(lambda: fresh in d.ledger.ended_ids(), 10, what="the fresh task ran")


def test_a_task_that_arrives_before_it_is_due_waits_and_then_runs(daemon, amqp, qname):
    # As a delay longer than one pass through the levels arrives: in its work queue,
    # with its due time still ahead.
    d = daemon([queue_config(qname, handler={"python": "timefns:due"})])
    due_ms = int(time.time() * 1000) + 3000
    mid = amqp.publish(qname, "n=1", headers={delays.H_DUE_MS: due_ms, delays.H_TO: qname})
    wait_for(lambda: d.ledger.events("start"), 15, what=lambda: f"the task ran; log:\n{d.log()[-2000:]}")
    (start,) = d.ledger.events("start")
    assert start["id"] == mid and start["t"] * 1000 >= due_ms, (start["t"], due_ms)
    assert "before it is due: back through the delay levels" in d.log()
    # Sent round is not an outcome: one task, one success, nothing else counted.
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 1, 5,
             what="success counted")
    assert d.metric(OUTCOME, queue=qname) == 1


def test_retry_later_with_a_delay_comes_back_after_that_delay(daemon, amqp, qname):
    d = daemon([queue_config(qname, handler={"python": "timefns:back_in"},
                             retry={"attempts": 1, "backoff": [1], "max_deferrals": 1})])
    amqp.publish(qname, "delay=3")
    wait_for(lambda: d.ledger.events("end"), 20, what=lambda: f"the second run; log:\n{d.log()[-2000:]}")
    first, second = d.ledger.events("start")
    assert second["t"] - first["t"] >= 3.0, (first["t"], second["t"])
    assert (first["attempt"], second["attempt"], second["deferrals"]) == (1, 1, 1)
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 1, 5,
             what="success counted")
    assert d.metric(OUTCOME, queue=qname, outcome="deferred") == 1


def test_five_hundred_delayed_tasks_none_early_none_lost(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=4, prefetch=20, handler={"python": "timefns:due"})])
    rng = random.Random(7)
    submitted = {}
    with Client(BROKER_URL) as client:
        for i in range(500):
            delay = rng.randint(1, 20)
            submitted[client.submit(f"n={i}".encode(), queue=qname, delay=delay)] = delay
    wait_for(lambda: len(d.ledger.events("start")) >= 500, 60,
             what=lambda: f"500 delayed tasks run; log:\n{d.log()[-2000:]}")
    starts = d.ledger.events("start")
    assert sorted(e["id"] for e in starts) == sorted(submitted), "a task lost or run twice"
    lateness = sorted(e["t"] - e["due_ms"] / 1000 for e in starts)
    assert lateness[0] >= 0, f"a task ran {-lateness[0]:.3f} s before it was due"
    p50, p99 = lateness[len(lateness) // 2], lateness[int(len(lateness) * 0.99)]
    print(f"[levels] 500 tasks, delays 1..20 s: lateness p50 {p50:.3f} s, p99 {p99:.3f} s, "
          f"max {lateness[-1]:.3f} s")


def test_the_poller_counts_the_tasks_waiting_in_the_levels(amqp, qname):
    import pika

    from workqd.poller import poll_delayed
    amqp.declare(qname, "classic")
    with Client(BROKER_URL) as client:
        client.submit_many([b"a", b"b", b"c"], queue=qname, delay=120)
    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        # Other tests share the vhost's levels: at least these three wait there.
        assert poll_delayed(conn) >= 3
        # A passive declare of something missing closed a channel, not the connection.
        assert conn.is_open
    finally:
        conn.close()


def test_a_due_task_reaches_its_own_queue_and_no_other(amqp, qname):
    # x-match "all" leaves x- headers out: such a binding took every due task of the
    # vhost. An earlier build made it; preparing a queue removes it.
    other = f"{qname}.other"
    try:
        amqp.declare(qname, "classic")
        amqp.declare(other, "classic")
        ch = amqp.channel()
        # On a fresh broker the delivery exchange exists only once something declared it.
        delays.declare(ch)
        delays.bind(ch, delays.stray_delivery_binding(other)._replace(remove=False))
        delays.prepare(ch, other)
        # Other tests' due tasks may have taken the planted binding before it went.
        ch.queue_purge(other)
        with Client(BROKER_URL) as client:
            client.submit(b"mine", queue=qname, delay=1)
        wait_for(lambda: amqp.count(qname) == 1, 15, what="the due task in its queue")
        assert amqp.count(other) == 0
    finally:
        amqp.delete(other)
