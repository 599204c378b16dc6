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
    work, delay = _arguments(qname), _arguments(f"{qname}.delay.1s")
    assert "quorum" in work and "x-delivery-limit" in work and f"{qname}.dead" in work, work
    assert "quorum" in delay and "x-message-ttl" in delay, delay
    mid = amqp.publish(qname, "fail=1")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 20,
             what="retried through the quorum delay queue, then dead-lettered")
    assert [e["attempt"] for e in d.ledger.events("start") if e["id"] == mid] == [1, 2]
    assert d.stop() == 0


def test_queues_of_an_older_workqd_are_used_with_a_warning(daemon, amqp, qname):
    # What workqd 0.1 declared: a quorum work queue without a dead-letter target,
    # and classic delay queues.
    amqp.declare(qname, "quorum")
    amqp.channel().queue_declare(f"{qname}.delay.1s", durable=True, arguments={
        "x-queue-type": "classic", "x-message-ttl": 1000, "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": qname})
    d = daemon([queue_config(qname, type="quorum", workers=1,
                             retry={"attempts": 2, "backoff": [1]})])
    log = d.log()
    assert f"queue {qname} exists with the arguments of an older workqd" in log
    assert "rabbitmqctl set_policy" in log
    assert f"queue {qname}.delay.1s exists with the arguments of an older workqd" in log
    mid = amqp.publish(qname, "fail=1")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 20,
             what="retry through the old delay queue, then dead-lettered")
    assert [e["attempt"] for e in d.ledger.events("start") if e["id"] == mid] == [1, 2]
    assert d.stop() == 0
