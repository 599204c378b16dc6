"""Schedules on the real broker: several daemons, one firing per slot, a leader killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import rawamqp
from conftest import ROOT, _children_of, queue_config, wait_for
from .test_master_robust import start_through
from workqd import schedules

EVERY = 2


@pytest.fixture
def schedule(amqp):
    """A fresh schedule name and the queue its firings go to; both gone at teardown."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    target = f"t.fired.{name}"
    amqp.declare(target, "classic")
    yield name, target
    amqp.delete(target, schedules.record_queue(name))


def slot_of(message_id: str, name: str) -> float:
    prefix, _, when = message_id.partition("@")
    assert prefix == name, message_id
    slot = schedules.from_iso(when)
    assert slot is not None, message_id
    return slot


def leaders(daemons, name) -> list:
    return [d for d in daemons if d.proc.poll() is None
            and d.metric("workqd_schedule_leader", schedule=name) == 1]


def kill_host(d) -> float:
    """kill -9 the daemon and every process of it, as a lost host would go."""
    pids = [d.proc.pid, *_children_of(d)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    d.proc.wait(10)
    return time.time()


def ctl(d, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workqd.ctl", "--socket",
                           d.config["control"]["socket"], *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_three_daemons_fire_each_slot_once_and_survive_a_killed_leader(
        daemon, qname, schedule, amqp, tmp_path):
    name, target = schedule
    entry = {"name": name, "every": f"{EVERY}s", "queue": target, "body": "tick",
             "headers": {"kind": "report"}, "catch_up": "last"}
    daemons = [daemon([queue_config(qname, workers=1)], schedules=[entry],
                      control={"socket": str(tmp_path / f"c{i}.sock")}) for i in range(3)]
    wait_for(lambda: len(leaders(daemons, name)) == 1, 30, what="one leader")
    wait_for(lambda: amqp.count(target) >= 3, 30, what="three firings")

    # workqctl schedules: every host names the schedule and the one that leads it.
    (leader,) = leaders(daemons, name)
    follower = next(d for d in daemons if d is not leader)
    answer = json.loads(ctl(follower, "schedules", "--json").stdout)
    (row,) = answer["schedules"]
    assert row["name"] == name and row["queue"] == target and row["leading"] is False

    def own_row():   # the master hears of firings with the poller's next report line
        (row,) = json.loads(ctl(leader, "schedules", "--json").stdout)["schedules"]
        return row if row["fired"] >= 1 else None
    own = wait_for(own_row, 20, what="the leader's firings in its status")
    assert own["leading"] is True and own["next"] > own["last_fired"]
    wait_for(lambda: json.loads(ctl(follower, "schedules", "--json").stdout)["schedules"][0]
             ["leader"] == own["leader"], 20, what=f"the follower naming {own['leader']}")
    text = ctl(leader, "schedules").stdout
    assert name in text and "this host" in text

    before = amqp.count(target)
    killed_at = kill_host(leader)
    survivors = [d for d in daemons if d is not leader]
    wait_for(lambda: len(leaders(survivors, name)) == 1, 30, what="a new leader")
    wait_for(lambda: amqp.count(target) >= before + 4, 30, what="firings after the failover")
    for d in survivors:
        d.stop()

    messages = amqp.get_all(target)
    ids = [p.message_id for p, _ in messages]
    slots = sorted(slot_of(i, name) for i in ids)
    assert all(b == b"tick" for _, b in messages)
    assert all(p.delivery_mode == 2 and p.headers["kind"] == "report"
               and p.headers[schedules.H_SCHEDULE] == name
               and p.headers[schedules.H_SLOT] == p.message_id.partition("@")[2]
               for p, _ in messages)
    # Every slot from the first to the last fired: none skipped by the failover.
    distinct = sorted(set(slots))
    assert distinct == [distinct[0] + EVERY * k for k in range(len(distinct))], slots
    # A slot fired twice is the one the killed leader fired without recording it: within
    # the failover window, with the same message id.
    twice = {s for s in slots if slots.count(s) > 1}
    assert all(killed_at - 2 * EVERY <= s <= killed_at + EVERY for s in twice), \
        (twice, killed_at)
    assert len(twice) <= 1


def test_a_schedule_to_a_missing_queue_logs_one_line(daemon, qname, amqp, tmp_path):
    name = f"t-{uuid.uuid4().hex[:8]}"
    missing = f"t.nowhere.{name}"
    try:
        d = daemon([queue_config(qname, workers=1)],
                   schedules=[{"name": name, "every": "1s", "queue": missing}])
        wait_for(lambda: d.metric("workqd_schedule_leader", schedule=name) == 1, 30,
                 what="leading")
        first = d.metric("workqd_schedule_next_fire_timestamp_seconds", schedule=name)
        wait_for(lambda: d.metric("workqd_schedule_next_fire_timestamp_seconds",
                                  schedule=name) >= first + 3, 30, what="three slots handled")
        assert d.log().count(f"returned unroutable: no queue {missing}") == 1, d.log()
        assert d.metric("workqd_schedule_fired_total", schedule=name) == 0
        assert d.proc.poll() is None
    finally:
        amqp.delete(schedules.record_queue(name))


def test_a_record_queue_declared_otherwise_is_one_line_and_no_firing(daemon, qname, amqp,
                                                                      tmp_path):
    """Someone declared workq.schedule.<name> as a classic queue: the leader cannot keep
    its record, so it fires nothing rather than fire blind, says so once, and stays up."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    target = f"t.fired.{name}"
    amqp.declare(target, "classic")
    amqp.declare(schedules.record_queue(name), "classic")
    try:
        d = daemon([queue_config(qname, workers=1)],
                   schedules=[{"name": name, "every": "1s", "queue": target}])
        line = f"cannot declare its record {schedules.record_queue(name)}, so no host can fire"
        wait_for(lambda: line in d.log(), 30, what=lambda: f"the refusal; log:\n{d.log()}")
        # Reports 5 s apart show the next slot moving on (nothing handled, so it follows
        # the clock); two of them span several tries (every 2 s) that logged nothing more.
        nxt = "workqd_schedule_next_fire_timestamp_seconds"
        wait_for(lambda: d.metric(nxt, schedule=name) > 0, 30, what="a report")
        first = d.metric(nxt, schedule=name)
        wait_for(lambda: d.metric(nxt, schedule=name) >= first + 6, 30,
                 what="two more reports")
        assert d.log().count(line) == 1, d.log()
        assert d.metric("workqd_schedule_leader", schedule=name) == 0
        assert amqp.count(target) == 0
        assert d.proc.poll() is None
    finally:
        amqp.delete(target, schedules.record_queue(name))


def test_a_schedules_call_left_unanswered_restarts_the_poller_and_firing_resumes(
        daemon, qname, schedule, monkeypatch):
    """A broker that keeps the connection up and never answers the record's basic_get
    (a quorum queue whose leader was lost did so for minutes) would hold the schedules
    thread, and with it this host's lead, for ever. A turn of that thread overdue past
    STUCK_AFTER (3 s here, 60 s in production) ends the poller child; the master starts
    another, and once the broker answers again the schedule fires."""
    name, target = schedule
    relay = rawamqp.Relay(drop=rawamqp.BASIC_GET)
    relay.dropping.set()
    try:
        monkeypatch.setenv("WORKQ_SCHEDULES_STUCK_AFTER", "3")
        d = start_through(relay, daemon, [queue_config(qname, workers=1)],
                          schedules=[{"name": name, "every": "1s", "queue": target}])
        wait_for(lambda: "schedules: a broker call has not returned" in d.log(), 60,
                 what=lambda: f"the stuck schedules named; log:\n{d.log()}")
        assert relay.dropped >= 1
        assert d.metric("workqd_schedule_fired_total", schedule=name) in (None, 0)
        relay.dropping.clear()
        wait_for(lambda: (d.metric("workqd_schedule_fired_total", schedule=name) or 0) >= 1,
                 60, what=lambda: f"a firing once the broker answers; log:\n{d.log()}")
        assert d.proc.poll() is None
        assert d.stop() == 0
    finally:
        relay.close()
