"""Cancelling across hosts: two daemons on different nodes of the 3-node cluster, the
cancels published through a third node.

Daemon A's broker URL list starts with wqa and daemon B's with wqb, so each daemon's
cancel-log reader (its poller) and its workers (one per queue) connect there. Four
tasks are cancelled through wqc: one waiting in its queue, one in the delay levels, one
running command and one running Python task. Daemon B is restarted between the cancel
and the waiting task's delivery, so it must read the log again from the stream's start
before it takes that task. None may run (or keep running); each ends in its queue's
``.dead`` queue as ``cancelled``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika
import pika.exceptions
import pytest

from conftest import ROOT, queue_config, wait_for
from workqd.client import Client

from .test_cluster import Client as ClusterClient
from .test_cluster import exited

pytestmark = pytest.mark.cluster

HEARTBEAT = 5
DELAY = 12   # seconds: long enough for both daemons to read the cancel before it is due


def favouring(cluster, first: str) -> dict:
    """A broker section whose URL list starts with ``first``, then the other two."""
    names = list(cluster.nodes)
    k = names.index(first)
    return {"urls": [cluster.url(n) for n in names[k:] + names[:k]], "heartbeat": HEARTBEAT}


def ctl(d, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "workqd.ctl", "-c", str(d.path), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def read_by(d, mid: str) -> bool:
    return f"cancel of message {mid} read" in d.log()


def take_all(reader: ClusterClient, queue: str) -> list:
    """Every message on ``queue`` (consumed), as (properties, body)."""
    out = []
    ch = reader.channel()
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((props, body))


def command_script(tmp_path: Path) -> tuple[Path, Path]:
    """A long command that notes each start and the TERM it gets in its own ledger."""
    ledger = tmp_path / "command-ledger"
    script = tmp_path / "long.sh"
    script.write_text(f"""#!/bin/sh
trap 'echo "term $WORKQ_MESSAGE_ID $$" >> {ledger}; exit 143' TERM
echo "start $WORKQ_MESSAGE_ID $$" >> {ledger}
while :; do sleep 0.1; done
""")
    script.chmod(0o755)
    return script, ledger


def command_events(ledger: Path) -> list[tuple[str, str, int]]:
    if not ledger.exists():
        return []
    return [(w[0], w[1], int(w[2])) for w in
            (line.split() for line in ledger.read_text().splitlines()) if len(w) == 3]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def queues(healed_cluster):
    """Three fresh quorum queue names (Python tasks, commands, waiting tasks); they and
    their dead-letter queues go after."""
    tag = uuid.uuid4().hex[:8]
    names = {k: f"t.clc.{k}.{tag}" for k in ("py", "cmd", "wait")}
    yield names
    cleanup = ClusterClient(healed_cluster)
    cleanup.delete(*names.values(), *(f"{n}.dead" for n in names.values()))
    cleanup.close()


def test_cancels_published_via_a_third_node_reach_both_daemons(healed_cluster, queues, daemon,
                                                               tmp_path):
    c = healed_cluster
    script, cmd_ledger = command_script(tmp_path)
    qs = [queue_config(queues["py"], type="quorum", workers=1, timeout=120),
          queue_config(queues["cmd"], type="quorum", workers=1, timeout=120,
                       timeout_grace=10, handler={"command": [str(script)]}),
          queue_config(queues["wait"], type="quorum", workers=1)]
    socks = {name: str(tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.sock") for name in "ab"}
    a = daemon(qs, broker=favouring(c, "wqa"), control={"socket": socks["a"]})
    b = daemon(qs, broker=favouring(c, "wqb"), control={"socket": socks["b"]})
    both = [a, b]
    # Each daemon's cancel-log reader is on its first node: the cancels cross nodes.
    wait_for(lambda: sorted(x["node"] for x in c.connections()
                            if x["connection_name"] == "workqd master (queue poller)")
             == ["wqa", "wqb"], 30, interval=1, what="the pollers on wqa and wqb")
    # The waiting task's queue is paused on both: it stays in its queue.
    for d, sock in ((a, socks["a"]), (b, socks["b"])):
        r = ctl(d, "--socket", sock, "pause", queues["wait"])
        assert r.returncode == 0, r.stderr
    inspector = ClusterClient(c)
    wait_for(lambda: inspector.consumers(queues["wait"]) == 0, 20, what="no consumer on wait")

    producer = Client(list(c.urls), confirm_timeout=30)
    try:
        waiting = producer.submit(b"n=waiting", queue=queues["wait"])
        delayed = producer.submit(b"n=delayed", queue=queues["py"], delay=DELAY)
        due = time.monotonic() + DELAY
        python = producer.submit(b"sleep=90", queue=queues["py"])
        command = producer.submit(b"x", queue=queues["cmd"])
    finally:
        producer.close()
    ledger_starts = lambda: [e for d in both for e in d.ledger.events("start")]  # noqa: E731
    wait_for(lambda: any(e["id"] == python for e in ledger_starts()) or exited(both), 30,
             what="the Python task running")
    wait_for(lambda: any(e[:2] == ("start", command) for e in command_events(cmd_ledger))
             or exited(both), 30, what="the command running")
    assert not exited(both), exited(both)
    (_, _, command_pid), = [e for e in command_events(cmd_ledger) if e[0] == "start"]

    ids = [waiting, delayed, python, command]
    canceller = Client([c.url("wqc")], confirm_timeout=30)
    t_cancel = time.monotonic()
    try:
        for mid in ids:
            canceller.cancel(mid)
    finally:
        canceller.close()
    wait_for(lambda: all(read_by(d, m) for d in both for m in ids), 20, interval=0.1,
             what="both daemons read the four cancels")
    t_read = time.monotonic() - t_cancel
    assert time.monotonic() < due, "the cancels were read after the delayed task was due"

    # B restarts; its pause is gone with it, so its wait worker takes the waiting task,
    # and only after its poller has read the log again (through wqb).
    reads = b.log().count("cancel log workq.cancel read")
    assert b.stop() == 0
    b.start()
    wait_for(lambda: b.log().count("cancel log workq.cancel read") > reads or exited(both), 30,
             what="the restarted daemon read the log again")

    dead = {queues[k]: [] for k in queues}

    def collect() -> int:
        for q, got in dead.items():
            try:
                got.extend(take_all(inspector, f"{q}.dead"))
            except pika.exceptions.AMQPError:
                inspector.abandon()
        return sum(len(v) for v in dead.values())

    wait_for(lambda: collect() >= 4 or exited(both), max(10, due - time.monotonic()) + 30,
             interval=0.5, what=lambda: f"four tasks dead-lettered, have {dead}")
    assert not exited(both), exited(both)
    where = {props.message_id: (q, props.headers.get("x-workq-reason"))
             for q, got in dead.items() for props, _ in got}
    assert where == {waiting: (queues["wait"], "cancelled"),
                     delayed: (queues["py"], "cancelled"),
                     python: (queues["py"], "cancelled"),
                     command: (queues["cmd"], "cancelled")}, where

    # Nothing ran that was cancelled before it started; what ran was stopped, not retried.
    starts = [e["id"] for e in ledger_starts()]
    assert waiting not in starts and delayed not in starts
    assert starts.count(python) == 1
    assert python not in {e["id"] for d in both for e in d.ledger.events("end")}
    assert [e[0] for e in command_events(cmd_ledger)] == ["start", "term"]
    wait_for(lambda: gone(command_pid), 10, what="the command's process gone")
    for q in queues.values():
        assert inspector.count(q) == 0
    # A's wait worker is still paused: the restarted B was the one offered the waiting task.
    assert inspector.consumers(queues["wait"]) == 1
    inspector.close()
    print(f"\n[cluster cancel] 4 cancels via wqc read by both daemons (wqa, wqb) "
          f"{t_read:.2f}s after the first was sent; all 4 dead-lettered as cancelled, "
          f"none ran or kept running, B restarted in between")
    for d in both:
        assert d.stop() == 0
