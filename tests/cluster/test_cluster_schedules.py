"""A schedule on a 3-node cluster: three daemons, each polling through its own node; the
node of the leader's connection is killed, and every slot still fires, once but for the
one the failover may repeat under the same message id. A three-minute soak puts a
killed leader daemon, a killed node and a restarted daemon into one run; and a memory
alarm on a single node holds up firings, never the poller's other work."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pika
import pika.exceptions
import pytest

from conftest import _children_of, queue_config, wait_for
from workqd import schedules

pytestmark = pytest.mark.cluster

EVERY = 2
HEARTBEAT = 5
SOAK = 180          # seconds the soak runs, from the first firing
SOAK_EVENTS = (30, 80, 130)   # seconds into it: leader daemon kill -9, node kill -9, restart


def node_client(cluster, name=None):
    conn = pika.BlockingConnection(pika.URLParameters(cluster.url(name or cluster.any_up())))
    ch = conn.channel()
    ch.confirm_delivery()
    return conn, ch


def declare_target(cluster, target: str) -> None:
    """The queue the firings go to: quorum, so it survives the node kills."""
    conn, ch = node_client(cluster, "wqa")
    ch.queue_declare(target, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()


def scheduling_daemon(cluster, daemon, i: int, name: str, target: str, work: str):
    """Daemon ``i`` of three; its connections (and so its leadership) start on node i."""
    return daemon([queue_config(work, type="quorum", workers=1)],
                  broker={"urls": cluster.urls[i:] + cluster.urls[:i], "heartbeat": HEARTBEAT},
                  schedules=[{"name": name, "every": f"{EVERY}s", "queue": target,
                              "catch_up": "last"}])


def test_a_schedule_survives_the_loss_of_its_leaders_node(healed_cluster, daemon, tmp_path):
    c = healed_cluster
    name = f"t-{uuid.uuid4().hex[:8]}"
    target, work = f"t.cl.fired.{name}", f"t.cl.{name}"
    declare_target(c, target)
    names = list(c.nodes)
    daemons = []
    try:
        for i in range(3):
            daemons.append(scheduling_daemon(c, daemon, i, name, target, work))
        wait_for(lambda: sum(d.metric("workqd_schedule_leader", schedule=name)
                             for d in daemons) == 1, 60, what="one leader")
        (leader,) = [i for i, d in enumerate(daemons)
                     if d.metric("workqd_schedule_leader", schedule=name) == 1]
        node = names[leader]
        wait_for(lambda: "fired " + name in daemons[leader].log(), 30, what="a firing")
        c.kill9(node)
        killed_at = time.time()

        def fired_since() -> int:
            try:
                conn, ch = node_client(c)
            except pika.exceptions.AMQPError:
                return 0
            try:
                n = ch.queue_declare(target, passive=True).method.message_count
            finally:
                conn.close()
            return n

        # Fired after the loss: by whichever host leads now (the old leader's daemon may
        # lead again from another node).
        wait_for(lambda: any(f"fired {name}@" in line and _after(line, killed_at + EVERY)
                             for d in daemons for line in d.log().splitlines()), 90,
                 what="a firing after the node loss")
        wait_for(lambda: fired_since() >= 6, 60, what="firings after the loss")
        failover = min(_stamp(line) for d in daemons for line in d.log().splitlines()
                       if f"fired {name}@" in line and _stamp(line) > killed_at) - killed_at
        for d in daemons:
            d.stop()
        conn, ch = node_client(c)
        slots = []
        while True:
            method, props, _ = ch.basic_get(target, auto_ack=True)
            if method is None:
                break
            prefix, _, when = props.message_id.partition("@")
            assert prefix == name
            slots.append(schedules.from_iso(when))
        ch.queue_delete(target)
        ch.queue_delete(schedules.record_queue(name))
        conn.close()
        slots.sort()
        distinct = sorted(set(slots))
        assert distinct == [distinct[0] + EVERY * k for k in range(len(distinct))], slots
        twice = {s for s in slots if slots.count(s) > 1}
        assert len(twice) <= 1 and all(killed_at - 2 * EVERY <= s <= killed_at + EVERY
                                       for s in twice), (twice, killed_at)
        print(f"\nschedule failover after kill -9 of {node}: first firing after the loss "
              f"{failover:.2f} s later; {len(slots)} firings, {len(distinct)} slots, "
              f"{len(slots) - len(distinct)} repeated")
    finally:
        for d in daemons:
            d.stop()


def _stamp(line: str) -> float:
    """The time of a log line ("queue poller (pid N): 2026-12-06 17:45:06,181 INFO ...")."""
    try:
        text = line.split("): ", 1)[1][:23]
        return time.mktime(time.strptime(text[:19], "%Y-%m-%d %H:%M:%S")) + int(text[20:]) / 1000
    except (IndexError, ValueError):
        return 0.0


def _after(line: str, t: float) -> bool:
    return _stamp(line) > t


def _firings(url: str, target: str, name: str) -> list[float]:
    """The slots of the firings in ``target``, taken out, in order of arrival."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    slots = []
    while True:
        method, props, _ = ch.basic_get(target, auto_ack=True)
        if method is None:
            break
        prefix, _, when = props.message_id.partition("@")
        assert prefix == name, props.message_id
        slots.append(schedules.from_iso(when))
    conn.close()
    return slots


def test_an_alarm_holds_up_firings_only_and_they_fire_late_after_it(daemon, plain_node):
    """A memory alarm blocks the schedules' connection, not the poller's: the depths
    are polled all through it; the slots it held up fire after it, each once."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    target, work = f"t.alarm.fired.{name}", f"t.alarm.{name}"
    conn = pika.BlockingConnection(pika.URLParameters(plain_node.url))
    ch = conn.channel()
    ch.queue_declare(target, durable=True)
    ch.queue_declare(work, durable=True)
    conn.close()
    d = daemon([queue_config(work, workers=1)], broker={"url": plain_node.url},
               schedules=[{"name": name, "every": f"{EVERY}s", "queue": target}])
    try:
        wait_for(lambda: d.metric("workqd_schedule_fired_total", schedule=name) >= 2, 30,
                 what="firings before the alarm")
        wait_for(lambda: d.metric("workqd_queue_consumers", queue=work) == 1, 30,
                 what="the worker's consumer polled")
        with plain_node.memory_alarm():
            wait_for(lambda: "firing is held up" in d.log(), 30, what="the alarm's one line")
            # A consumer that only consumes is not blocked: the poller must see it.
            watcher = pika.BlockingConnection(pika.URLParameters(plain_node.url))
            wch = watcher.channel()
            wch.basic_consume(work, lambda *a: None)
            wait_for(lambda: d.metric("workqd_queue_consumers", queue=work) == 2, 30,
                     what="the poller polling depths during the alarm")
            # That report came after the line, so it counts every firing confirmed
            # before the alarm.
            held = d.metric("workqd_schedule_fired_total", schedule=name)
            watcher.close()
            wait_for(lambda: d.metric("workqd_queue_consumers", queue=work) == 1, 30,
                     what="the poller polling depths during the alarm, again")
            # Held up, not fired: the count stands through a later report.
            assert d.metric("workqd_schedule_fired_total", schedule=name) == held
            alarm_ended = time.time()
        wait_for(lambda: "the broker takes publishes again" in d.log(), 30,
                 what="firing resumed after the alarm")
        wait_for(lambda: d.metric("workqd_schedule_fired_total", schedule=name) >= held + 3,
                 30, what="firings after the alarm")
        assert d.log().count("firing is held up") == 1, d.log()
        print("\n" + "\n".join(line for line in d.log().splitlines() if "schedules:" in line))
        assert "broker not reachable" not in d.log()
        assert d.stop() == 0
        slots = _firings(plain_node.url, target, name)
        # Every slot from the first to the last, the alarm's late ones too, once each.
        assert slots == sorted(slots) and len(set(slots)) == len(slots), slots
        assert slots == [slots[0] + EVERY * k for k in range(len(slots))], slots
        assert slots[-1] > alarm_ended
    finally:
        d.stop()
        conn = pika.BlockingConnection(pika.URLParameters(plain_node.url))
        ch = conn.channel()
        for q in (target, work, schedules.record_queue(name)):
            ch.queue_delete(q)
        conn.close()


def _leader(daemons, name) -> int:
    """The index of the one daemon that leads ``name``, once exactly one does."""
    def one():
        up = [i for i, d in enumerate(daemons) if d.proc.poll() is None
              and d.metric("workqd_schedule_leader", schedule=name) == 1]
        return up if len(up) == 1 else None
    return wait_for(one, 60, what="one leader")[0]


def _kill_host(d) -> None:
    """kill -9 the daemon and every process of it, as a lost host would go."""
    for pid in [d.proc.pid, *_children_of(d)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    d.proc.wait(10)


def _fired_lines(daemons, name) -> list[tuple[float, str]]:
    """(log time, message id) of every firing any daemon logged, in time order."""
    out = []
    for d in daemons:
        for line in d.log().splitlines():
            if f"fired {name}@" in line:
                out.append((_stamp(line), line.split("fired ", 1)[1].split()[0]))
    return sorted(out)


def test_a_three_minute_soak_through_a_killed_leader_a_killed_node_and_a_restart(
        healed_cluster, daemon):
    """Every slot fires; a slot fires twice only in a failover window, at most one per
    window, under the same message id. Each window (event to the next firing) printed."""
    c = healed_cluster
    name = f"t-{uuid.uuid4().hex[:8]}"
    target, work = f"t.cl.soak.{name}", f"t.cl.soakw.{name}"
    declare_target(c, target)
    names = list(c.nodes)
    daemons = []
    events: list[tuple[str, float]] = []
    try:
        for i in range(3):
            daemons.append(scheduling_daemon(c, daemon, i, name, target, work))
        _leader(daemons, name)
        wait_for(lambda: _fired_lines(daemons, name), 30, what="a first firing")
        start = time.time()

        def until(offset: float) -> None:   # pacing the soak: a deadline, not a sleep
            wait_for(lambda: time.time() >= start + offset, offset + 60, interval=0.5,
                     what=f"{offset} s into the soak")

        def fired_after(t: float) -> None:
            wait_for(lambda: any(at > t for at, _ in _fired_lines(daemons, name)), 90,
                     what=f"a firing after {events[-1][0]}")

        until(SOAK_EVENTS[0])
        victim = _leader(daemons, name)
        events.append((f"kill -9 of the leader daemon {victim}", time.time()))
        _kill_host(daemons[victim])
        fired_after(events[-1][1])
        daemons[victim].start()   # back as a follower

        until(SOAK_EVENTS[1])
        # The node a leader's schedules connection starts on is its first URL's; the
        # daemons have not failed over since they (re)started.
        node = names[_leader(daemons, name)]
        events.append((f"kill -9 of node {node}, the leader's", time.time()))
        c.kill9(node)
        fired_after(events[-1][1])

        until(SOAK_EVENTS[2])
        victim = _leader(daemons, name)
        events.append((f"restart of the leader daemon {victim}", time.time()))
        daemons[victim].stop()
        daemons[victim].start()
        fired_after(events[-1][1])

        until(SOAK)
        for d in daemons:
            d.stop()
        fired = _fired_lines(daemons, name)
        conn, ch = node_client(c)
        got = []
        while True:
            method, props, _ = ch.basic_get(target, auto_ack=True)
            if method is None:
                break
            assert props.headers[schedules.H_SLOT] == props.message_id.partition("@")[2]
            got.append(props.message_id)
        ch.queue_delete(target)
        ch.queue_delete(schedules.record_queue(name))
        conn.close()
    finally:
        for d in daemons:
            d.stop()

    slots = sorted(schedules.from_iso(m.partition("@")[2]) for m in got)
    assert all(m.partition("@")[0] == name for m in got), got
    distinct = sorted(set(slots))
    # Every slot from the first to the last fired, whatever happened between.
    every_slot = {distinct[0] + EVERY * k
                  for k in range(int(distinct[-1] - distinct[0]) // EVERY + 1)}
    missing = sorted(every_slot - set(distinct))
    assert not missing, [schedules.iso(s) for s in missing]
    assert distinct[-1] - distinct[0] >= SOAK - 2 * EVERY, (distinct[0], distinct[-1])
    # A failover window: from EVERY before the event (the slot the old leader may have
    # fired without recording it) to the new leader's first firing.
    windows, late = [], {}
    for what, at in events:
        first, mid = min((t, m) for t, m in fired if t > at)
        windows.append((what, at, first))
        late[what] = first - schedules.from_iso(mid.partition("@")[2])
    twice = sorted({s for s in slots if slots.count(s) > 1})
    assert all(slots.count(s) == 2 for s in twice), twice
    for s in twice:
        assert any(at - 2 * EVERY <= s <= first for _, at, first in windows), \
            (schedules.iso(s), [(w, at, first) for w, at, first in windows])
    for what, at, first in windows:
        inside = [s for s in twice if at - 2 * EVERY <= s <= first]
        assert len(inside) <= 1, (what, [schedules.iso(s) for s in inside])
    print(f"\nschedule soak, every {EVERY}s for {SOAK} s on 3 nodes with 3 daemons: "
          f"{len(got)} firings, {len(distinct)} slots, {len(twice)} repeated "
          f"({', '.join(schedules.iso(s) for s in twice) or 'none'})")
    for what, at, first in windows:
        print(f"  {what}: next firing {first - at:.2f} s later, {late[what]:.2f} s after "
              f"its slot")
