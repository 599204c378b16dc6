"""Quorum queues and the broker's own delivery limit.

RabbitMQ 4.0 gives every quorum queue a default delivery limit of 20 and drops
a message past it unless the queue has a dead-letter target. A task must never
vanish: above that limit, max_redeliveries keeps the meaning the README gives
it, and a poison task ends in <queue>.dead with a reason. RabbitMQ 3.10 has no
default limit, so this passes there through workqd's own poison detection.
"""

from __future__ import annotations

import time

from conftest import queue_config, wait_for

MAX_REDELIVERIES = 25   # above RabbitMQ 4.0's default delivery-limit of 20


def test_poison_above_the_broker_delivery_limit_ends_in_the_dead_letter_queue(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=2, type="quorum",
                             max_redeliveries=MAX_REDELIVERIES)])
    poison = amqp.publish(qname, "die=1")
    healthy = amqp.publish(qname, "n=after sleep=0.05")

    def runs() -> list[dict]:
        return [e for e in d.ledger.events("start") if e["id"] == poison]

    last = {"n": 0, "at": time.monotonic()}

    def settled_or_dropped() -> str:
        if amqp.count(f"{qname}.dead") >= 1:
            return "dead-lettered"
        n = len(runs())
        if n != last["n"]:
            last.update(n=n, at=time.monotonic())
        # Nobody runs it, nothing is ready, no new run for 15 s: the broker dropped it.
        if (amqp.count(qname) == 0 and time.monotonic() - last["at"] > 15
                and d.metric("workqd_tasks_in_flight", queue=qname) == 0):
            return "dropped"
        return ""

    outcome = wait_for(settled_or_dropped, 240, interval=0.2, what="the poison task to settle")
    deliveries = [e["delivery_count"] for e in runs()]
    assert outcome == "dead-lettered", (
        f"the poison task vanished after {len(runs())} runs (x-delivery-count seen: "
        f"{deliveries}): not in {qname}, not in {qname}.dead")
    (props, _), = amqp.get_all(f"{qname}.dead")
    assert props.message_id == poison
    assert props.headers["x-workq-reason"] == "poison", props.headers
    # It killed exactly max_redeliveries workers, as the README says, then no more.
    assert len(runs()) == MAX_REDELIVERIES, deliveries
    wait_for(lambda: healthy in d.ledger.ended_ids(), 20, what="the healthy task done")
    assert amqp.count(qname) == 0
    assert "it is poison" in d.log()
