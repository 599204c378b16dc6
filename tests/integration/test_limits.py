"""Cluster-wide limits (limits.concurrency, limits.rate) across several real daemons on
the machine broker: what runs at once and when tasks start, read from the handlers'
ledgers, never from workqd's own word."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import Amqp, queue_config, wait_for

from workqd import limits

CTL = [sys.executable, "-m", "workqd.ctl"]


def intervals(daemons) -> list[tuple[float, float]]:
    """(start, end) of every completed run in the daemons' ledgers."""
    out = []
    for d in daemons:
        starts = {}
        for e in d.ledger.entries():
            key = (e["id"], e["pid"])
            if e["event"] == "start":
                starts[key] = e["t"]
            elif e["event"] == "end" and key in starts:
                out.append((starts.pop(key), e["t"]))
    return out


@pytest.fixture
def token_queues(broker):
    """Token queues a test made: durable, so deleted at teardown."""
    names: list[str] = []
    yield names
    cleanup = Amqp()
    cleanup.delete(*names)
    cleanup.close()


def starts(daemons) -> list[dict]:
    return [e for d in daemons for e in d.ledger.events("start")]


def running_at(daemons, t: float) -> int:
    """Runs begun by ``t`` and not ended by then (a run of a killed worker never ends:
    only runs of live daemons count)."""
    n = 0
    for d in daemons:
        ended = {(e["id"], e["pid"]) for e in d.ledger.events("end")}
        n += sum(1 for e in d.ledger.events("start")
                 if e["t"] <= t and (e["id"], e["pid"]) not in ended)
    return n


def publish(amqp: Amqp, queue: str, n: int, body: str) -> None:
    for i in range(n):
        amqp.publish(queue, f"n={i} {body}")


def done(daemons, n: int) -> bool:
    return len({i for d in daemons for i in d.ledger.ended_ids()}) >= n


def capped(qname: str, cap: int, workers: int = 4, **extra) -> dict:
    return queue_config(qname, type="quorum", workers=workers,
                        limits={"concurrency": cap}, **extra)


def status(d, *, text: bool = False):
    """``workqctl status --json`` as an object, or the table as text."""
    out = subprocess.run([*CTL, "-c", str(d.path), "status", *([] if text else ["--json"])],
                         capture_output=True, text=True, timeout=30, env=d.env())
    assert out.returncode == 0, out.stderr
    return out.stdout if text else json.loads(out.stdout)


def test_a_cap_of_three_over_three_daemons_runs_exactly_three_at_once(daemon, amqp, qname):
    daemons = [daemon([capped(qname, 3)]) for _ in range(3)]
    publish(amqp, qname, 60, "sleep=0.2")
    wait_for(lambda: done(daemons, 60), 120, what="60 tasks done")
    assert limits.max_concurrent(intervals(daemons)) == 3
    # Nine workers wait for a slot meanwhile: that is no fault, every daemon stays ready.
    for d in daemons:
        assert d.http("/readyz")[0] == 200, d.http("/readyz")
    held = sum(d.metric("workqd_limit_slots_held", queue=qname) for d in daemons)
    waiting = sum(d.metric("workqd_limit_waiting", queue=qname, limit="concurrency")
                  for d in daemons)
    assert (held, waiting) == (3, 9)
    assert sum(d.metric("workqd_workers", queue=qname, state="limited") for d in daemons) == 9
    st = [status(d)["queues"][0]["limits"]["concurrency"] for d in daemons]
    assert [s["cap"] for s in st] == [3, 3, 3]
    assert sum(s["held_here"] for s in st) == 3
    wait_for(lambda: status(daemons[0])["queues"][0]["limits"]["concurrency"]["in_use"] == 3,
             30, what="3 slots in use on all hosts, from the polled consumers")
    table = status(daemons[0], text=True)
    assert "concurrency cap 3 (all hosts): 3 in use on all hosts, " in table, table
    assert "limited" in "".join(status(d, text=True) for d in daemons)
    assert sum(d.metric("workqd_limit_wait_seconds_total", queue=qname, limit="concurrency")
               for d in daemons) > 0


def test_a_daemon_killed_mid_run_gives_its_slots_back(daemon, amqp, qname):
    daemons = [daemon([capped(qname, 3, workers=2)], heartbeat=5) for _ in range(3)]
    publish(amqp, qname, 80, "sleep=0.3")
    wait_for(lambda: len(starts(daemons)) >= 10, 60, what="tasks under way")
    holder = next(d for d in daemons if d.metric("workqd_limit_slots_held", queue=qname) > 0)
    pids = holder.worker_pids()
    holder.proc.kill()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_at = time.time()
    alive = [d for d in daemons if d is not holder]
    wait_for(lambda: done(daemons, 80), 120, what="every task done")
    # Never more than three, counting the killed daemon's runs cut short.
    runs = intervals(alive)
    cut = intervals([holder])
    ended = {(s, e) for s, e in cut}
    for e in holder.ledger.events("start"):
        if not any(s == e["t"] for s, _ in ended):
            cut.append((e["t"], killed_at))
    assert limits.max_concurrent(runs + cut) <= 3
    # Back to three running well within the heartbeat plus five seconds: the kill
    # closed the holder's connections, and the broker deleted its locks at once.
    back = limits.first_reaching(runs, 3, killed_at)
    assert back is not None and back - killed_at < 5 + 5, back and back - killed_at


def test_a_reload_to_a_smaller_cap_converges(daemon, amqp, qname):
    d = daemon([capped(qname, 3, workers=3)])
    publish(amqp, qname, 200, "sleep=0.2")
    wait_for(lambda: len(d.ledger.events("start")) >= 6, 60, what="tasks under way")
    d.config["queues"][0]["limits"]["concurrency"] = 1
    d.write_config()
    d.send(signal.SIGHUP)
    wait_for(lambda: d.metric("workqd_limit_concurrency", queue=qname) == 1, 30,
             what="the new cap in the metrics")
    wait_for(lambda: len(d.worker_pids()) == 3 and status(d)["phase"] == "ready", 60,
             what="the reload done")
    after = time.time()
    wait_for(lambda: len([e for e in d.ledger.events("start") if e["t"] > after]) >= 10, 60,
             what="tasks after the reload")
    later = [r for r in intervals([d]) if r[0] > after]
    assert limits.max_concurrent(later) == 1


def test_a_rate_holds_across_daemons_and_none_starves(daemon, amqp, qname, token_queues):
    rate, burst, n = 20, 1, 60
    token_queues.append(limits.token_queue(qname, "20/s", burst))
    q = queue_config(qname, type="quorum", workers=2,
                     limits={"rate": f"{rate}/s", "burst": burst})
    daemons = [daemon([q]) for _ in range(3)]
    publish(amqp, qname, n, "sleep=0")
    wait_for(lambda: done(daemons, n), 60, what=f"{n} tasks done")
    times = [e["t"] for e in starts(daemons)]
    # The bound for 1 s counts a start trailing its token by up to a quarter second
    # (unlimited, the 60 tasks would all start within a tenth of a second).
    assert limits.max_in_window(times, 1.0) <= limits.window_bound(rate, burst, 1.0)
    assert max(times) - min(times) >= (n - burst) / rate - 0.5
    # Every daemon took its share: the broker hands tokens round-robin to those waiting.
    for d in daemons:
        assert len(d.ledger.events("start")) >= n / 3 / 2, [len(x.ledger.events("start"))
                                                            for x in daemons]
        assert d.http("/readyz")[0] == 200
    assert sum(d.metric("workqd_limit_tokens_taken_total", queue=qname) for d in daemons) == n
    st = status(daemons[0])["queues"][0]["limits"]["rate"]
    assert (st["rate"], st["burst"]) == ("20/s", 1)
    generators = [status(d)["queues"][0]["limits"]["rate"]["generator_here"] for d in daemons]
    assert generators.count(True) == 1


def test_tasks_waiting_for_a_token_go_back_when_the_daemon_stops(daemon, amqp, qname,
                                                                  token_queues):
    token_queues.append(limits.token_queue(qname, "6/min", 1))
    d = daemon([queue_config(qname, type="quorum", workers=3,
                             limits={"rate": "6/min", "burst": 1})])
    publish(amqp, qname, 6, "sleep=0")
    # One token at most in the first seconds; the other workers hold a task each, waiting.
    wait_for(lambda: d.metric("workqd_limit_waiting", queue=qname, limit="rate") >= 2, 30,
             what="tasks waiting for a token")
    assert d.http("/readyz")[0] == 200
    st = status(d)["queues"][0]["limits"]["rate"]
    assert st["tasks_waiting"] >= 2 and st["generator_here"]
    assert "rate 6/min, burst 1 (all hosts): " in status(d, text=True)
    assert d.stop() == 0
    # Nothing lost, nothing run twice: what did not start is back in the queue.
    ran = len(d.ledger.events("start"))
    wait_for(lambda: amqp.count(qname) == 6 - ran, 30, what="the waiting tasks back")
    assert ran <= 2
