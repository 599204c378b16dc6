"""Delayed tasks on the 3-node cluster: a node killed while they wait in the delay
levels loses none of them, and none arrives early (the levels are quorum queues with
at-least-once dead-lettering)."""

from __future__ import annotations

import random
import statistics
import time

import pika.exceptions
import pytest

from workqd.client import Client

from .test_cluster import Client as ClusterClient
from .test_cluster import cluster_queue  # noqa: F401  (the fixture)

pytestmark = pytest.mark.cluster

TASKS = 300


def test_a_node_killed_while_tasks_wait_in_the_levels_loses_none(healed_cluster,
                                                                   cluster_queue):  # noqa: F811
    c = healed_cluster
    queue, _ = cluster_queue
    submitter = Client(list(c.urls), confirm_timeout=30)
    rng = random.Random(7)
    due: dict[str, float] = {}
    try:
        for i in range(TASKS):
            delay = rng.uniform(4, 20)
            mid = submitter.submit(f"task {i}", queue=queue, delay=delay)
            due[mid] = time.time() + delay
    finally:
        submitter.close()
    # The levels were declared through wqa, so their leaders start there: lose it.
    c.kill9("wqa")
    reader = ClusterClient(c)
    arrived: dict[str, float] = {}
    duplicates = 0
    deadline = time.monotonic() + 120
    while len(arrived) < TASKS and time.monotonic() < deadline:
        try:
            method, props, _ = reader.get(queue)
        except (pika.exceptions.AMQPError, OSError):   # TimeoutError among them
            reader.abandon()   # its node went, or left the call unanswered: the next
                               # call picks a node that is up
            time.sleep(0.2)
            continue
        if method is None:
            time.sleep(0.05)
            continue
        if props.message_id in arrived:
            duplicates += 1
        arrived.setdefault(props.message_id, time.time())
    reader.close()
    missing = set(due) - set(arrived)
    assert not missing, f"{len(missing)} of {TASKS} delayed tasks lost"
    early = {m: due[m] - t for m, t in arrived.items() if t < due[m] - 0.05}
    assert not early, f"{len(early)} arrived early, by up to {max(early.values()):.2f}s"
    late = sorted(arrived[m] - due[m] for m in due)
    print(f"\n[cluster delays] {TASKS} tasks, wqa killed: none lost, none early, "
          f"{duplicates} duplicate(s); lateness p50 {statistics.median(late):.2f}s, "
          f"p99 {late[int(0.99 * len(late)) - 1]:.2f}s, max {late[-1]:.2f}s")
