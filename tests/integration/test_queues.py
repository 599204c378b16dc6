"""The queues workqd declares, and queues an older workqd left behind."""

from __future__ import annotations

import subprocess

from conftest import queue_config, wait_for

OUTCOME = "workqd_tasks_processed_total"


def _arguments(name: str) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "type", "arguments"],
                         capture_output=True, text=True, timeout=60).stdout
    return next((line for line in out.splitlines() if line.split("\t")[0] == name), "")


def test_quorum_queues_dead_letter_at_the_broker_limit_and_retry_on_quorum(daemon, amqp, qname):
    d = daemon([queue_config(qname, type="quorum", workers=1, max_redeliveries=4,
                             retry={"attempts": 2, "backoff": [1]})])
    work, level = _arguments(qname), _arguments("workq.delay.00")
    assert "quorum" in work and "x-delivery-limit" in work and f"{qname}.dead" in work, work
    # Retries wait in the vhost's shared delay levels (quorum, at-least-once), not in a
    # queue of their own.
    assert "quorum" in level and "at-least-once" in level, level
    assert _arguments(f"{qname}.delay.1s") == ""
    mid = amqp.publish(qname, "fail=1")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 20,
             what="retried through the delay levels, then dead-lettered")
    assert [e["attempt"] for e in d.ledger.events("start") if e["id"] == mid] == [1, 2]
    assert d.stop() == 0


def test_queues_of_an_older_workqd_are_used_with_a_warning(daemon, amqp, qname):
    # What workqd 0.1 declared: a quorum work queue without a dead-letter target,
    # and classic delay queues, one per backoff value; a retry still waits in one.
    amqp.declare(qname, "quorum")
    old_delay = f"{qname}.delay.1s"
    amqp.channel().queue_declare(old_delay, durable=True, arguments={
        "x-queue-type": "classic", "x-message-ttl": 1000, "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": qname})
    waiting = amqp.publish(old_delay, "n=waiting")
    d = daemon([queue_config(qname, type="quorum", workers=1,
                             retry={"attempts": 2, "backoff": [1]})])
    log = d.log()
    assert f"queue {qname} exists with the arguments of an older workqd" in log
    assert "rabbitmqctl set_policy" in log
    # The old delay queue is no longer declared or used; it drains into the work queue.
    assert old_delay not in log
    wait_for(lambda: waiting in d.ledger.ended_ids(), 20, what="the waiting retry ran")
    mid = amqp.publish(qname, "fail=1")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 20,
             what="retry through the delay levels, then dead-lettered")
    assert [e["attempt"] for e in d.ledger.events("start") if e["id"] == mid] == [1, 2]
    assert amqp.count(old_delay) == 0
    assert d.stop() == 0
