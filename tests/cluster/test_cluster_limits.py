"""A concurrency cap on a 3-node cluster: the node that carries slot holders' connections
is killed; the cap holds throughout (from the handlers' ledgers), the slots are taken
again on the surviving nodes, and every task is done."""

from __future__ import annotations

import time

import pytest

from conftest import queue_config, wait_for
from workqd import limits

from .test_cluster import broker_config, ended, starts, wait_all_consuming
from .test_cluster import cluster_queue  # noqa: F401  (the fixture)

pytestmark = pytest.mark.cluster

CAP = 2
TASKS = 200
TASK_SLEEP = 0.1


def spans(daemons, cut_at: float, cut_pids: set[int]) -> list[tuple[float, float]]:
    """(start, end) of each run; a run on a worker whose node was lost ends at the loss
    (its ack is lost and the task runs again elsewhere)."""
    out = []
    for d in daemons:
        begun = {}
        for e in d.ledger.entries():
            key = (e["id"], e["pid"])
            if e["event"] == "start":
                begun[key] = e["t"]
            elif e["event"] == "end" and key in begun:
                start = begun.pop(key)
                # A run begun before the loss on a cut-off worker: its process may finish
                # it after, but its slot went with the node (docs/limits.md: one extra
                # run per cut-off worker until it ends). The worker reconnects after.
                lost = e["pid"] in cut_pids and start < cut_at
                end = min(e["t"], cut_at) if lost else e["t"]
                out.append((start, end))
        out += [(t, max(t, cut_at)) for (_, pid), t in begun.items() if pid in cut_pids]
    return out


def test_a_cap_holds_when_the_node_of_its_holders_is_killed(healed_cluster, cluster_queue,
                                                            daemon):
    c = healed_cluster
    q, client = cluster_queue
    capped = queue_config(q, type="quorum", workers=3, timeout=60,
                          limits={"concurrency": CAP})
    daemons = [daemon([capped], broker=broker_config(c)) for _ in range(2)]
    nodes = wait_all_consuming(c, daemons)
    ids = client.publish(q, [f"n={i} sleep={TASK_SLEEP}" for i in range(TASKS)])
    wait_for(lambda: len(ended(daemons)) >= TASKS // 5, 120, interval=0.05,
             what="tasks flowing before the loss")
    # The node of a worker that runs tasks now holds a slot.
    recent = {e["pid"] for e in starts(daemons)[-CAP * 3:]}
    victim = next(node for pid, (_, node) in nodes.items() if pid in recent)
    cut = {pid for pid, (_, node) in nodes.items() if node == victim}
    t_loss = time.time()
    c.kill9(victim)
    client.abandon()
    wait_for(lambda: ended(daemons) >= set(ids), 240, interval=0.5,
             what=f"all {TASKS} tasks done after the loss of {victim}")
    runs = spans(daemons, t_loss, cut)
    assert limits.max_concurrent(runs) <= CAP
    back = limits.first_reaching([r for r in runs if r[0] >= t_loss], CAP, t_loss)
    print(f"cap {CAP}: node {victim} killed; {CAP} running again after "
          f"{back - t_loss:.2f}s" if back else "never back to the cap")
    assert back is not None and back - t_loss < 30
