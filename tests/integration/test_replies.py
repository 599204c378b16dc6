"""Replies: where a task's outcome may go, and what a reply the broker refuses may cost.

The task's publisher picks ``reply_to``, and the worker publishes there with workqd's
credentials: by default only to direct reply-to names (what ``workq-submit --wait``
consumes), to named queues only with ``allow_reply_queues``, and always on a
connection of its own, so that a refused reply never costs a confirm that a retry or
dead-letter copy waits for. Against the real broker and a real daemon; the gate and
the reply connection's channel handling also against fakes.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import uuid

import pika
import pytest

from conftest import BROKER_URL, ROOT, queue_config, wait_for
from workqd.config import Broker
from workqd.worker import publisher as pub

OUTCOME = "workqd_tasks_processed_total"

# RabbitMQ 3.10 closes the whole connection (541 INTERNAL_ERROR) on a publish to a
# direct reply-to name whose parts decode to no reply consumer; a publisher can put
# such a name in reply_to, and it passes the direct reply-to gate.
CRASHING_REPLY_TO = "amq.rabbitmq.reply-to.YWJj.x"


def _warnings_about_reply_to(d) -> list[str]:
    return [line for line in d.log().splitlines() if "allow_reply_queues: true" in line]


# --- against the real broker and daemon ------------------------------------------

def test_a_reply_aimed_at_the_work_queue_is_not_sent(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1)])
    ids = [amqp.publish(qname, f"n={n}", reply_to=qname) for n in (1, 2)]
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 2, 15,
             what="both tasks settled")
    assert d.stop(signal.SIGTERM) == 0   # the worker sends what it owes before it leaves
    assert amqp.count(qname) == 0, amqp.get_all(qname)
    assert sorted(e["id"] for e in d.ledger.events("start")) == sorted(ids)   # once each
    warned = _warnings_about_reply_to(d)
    assert len(warned) == 1, warned   # once per worker, not once per task
    assert f"queue {qname!r} (reply_to)" in warned[0] and "said once per worker" in warned[0]


@pytest.mark.parametrize("allowed", [False, True])
def test_a_named_reply_queue_gets_the_outcome_only_when_allowed(daemon, amqp, qname, allowed):
    replies = f"{qname}.replies"
    amqp.declare(replies, "classic")
    try:
        d = daemon([queue_config(qname, workers=1, allow_reply_queues=allowed)])
        mid = amqp.publish(qname, "n=1", reply_to=replies)
        if allowed:
            wait_for(lambda: amqp.count(replies) == 1, 15, what="the reply")
            (props, body), = amqp.get_all(replies)
            reply = json.loads(body)
            assert props.correlation_id == mid and props.content_type == "application/json"
            assert (reply["message_id"], reply["outcome"], reply["final"]) == (mid, "success",
                                                                               True)
            assert not _warnings_about_reply_to(d)
        else:
            wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 1, 15,
                     what="the task settled")
            assert d.stop(signal.SIGTERM) == 0
            assert amqp.count(replies) == 0
            assert len(_warnings_about_reply_to(d)) == 1
        assert [e["id"] for e in d.ledger.events("start")] == [mid]
    finally:
        amqp.delete(replies)


def test_refused_replies_never_cost_a_copy_its_confirm(daemon, amqp, qname):
    """Replies the broker drops (no such queue) or refuses by closing the connection,
    sent while retry and dead-letter copies of other tasks await their confirms: every
    try runs exactly once, and the copies' connection stays up."""
    d = daemon([queue_config(qname, workers=2, prefetch=20, allow_reply_queues=True,
                             retry={"attempts": 3, "backoff": [0.5]})])
    nowhere = f"no.such.queue.{uuid.uuid4().hex}"
    failing = ([amqp.publish(qname, f"fail=1 n=c{n}", reply_to=CRASHING_REPLY_TO)
                for n in range(10)]
               + [amqp.publish(qname, f"fail=1 n=m{n}", reply_to=nowhere) for n in range(10)]
               + [amqp.publish(qname, f"fail=1 n=p{n}") for n in range(10)])
    passing = [amqp.publish(qname, f"n=s{n}", reply_to=CRASHING_REPLY_TO) for n in range(10)]
    wait_for(lambda: amqp.count(f"{qname}.dead") == len(failing), 60,
             what=f"{len(failing)} tasks dead-lettered")
    wait_for(lambda: d.ledger.ended_ids() >= set(passing), 10, what="the passing tasks done")
    assert d.stop(signal.SIGTERM) == 0
    starts = d.ledger.events("start")
    tries = collections.defaultdict(list)
    for e in starts:
        tries[e["id"]].append(e["attempt"])
    assert {m: sorted(t) for m, t in tries.items() if t != [1, 2, 3]} == \
        {m: [1] for m in passing}, "a try ran more or less than once"
    assert not [e for e in starts if e["redelivered"]]
    dead = [props.message_id for props, _ in amqp.get_all(f"{qname}.dead")]
    assert sorted(dead) == sorted(failing)   # one dead letter each, no duplicate copy
    log = d.log()
    assert "reply connection lost" in log, "the broker refused no reply: nothing was tested"
    assert "publishing connection lost" not in log


def test_a_worker_stopped_mid_task_sends_its_reply_and_leaves_on_its_own(daemon, qname):
    """The reply connection opens for a worker's first reply. Stopped while that task
    runs, the worker sends the reply as the connection opens, after it last looked for
    anything unsent; it must look again then, and not sit until shutdown_timeout's
    SIGKILL (here ten minutes, past this test's deadline for the stop)."""
    d = daemon([queue_config(qname, workers=1)], shutdown_timeout=600)
    submit = subprocess.Popen(
        [sys.executable, "-m", "workqd.submit", "--url", BROKER_URL, "-q", qname, "--wait",
         "--timeout", "60", "--message-id", "across-stop", "n=1 sleep=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_for(lambda: d.ledger.events("start"), 30, what="the task started")
        assert d.stop(signal.SIGTERM, timeout=60) == 0
        out, err = submit.communicate(timeout=30)
    finally:
        submit.kill()
    assert out.startswith("across-stop success"), (out, err)
    log = d.log()
    assert "killed by SIGKILL" not in log and "exited with status 0 (shutdown)" in log, log


# --- the gate and the reply connection, against fakes ------------------------------

@pytest.mark.parametrize("reply_to, allowed, expected", [
    ("amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5.WQRT", False, True),
    ("amq.rabbitmq.reply-to.", False, False),
    ("amq.rabbitmq.reply-to", False, False),
    ("tasks", False, False),
    ("amq.gen-callback", False, False),
    ("tasks", True, True),
    ("amq.rabbitmq.reply-to.x.y", True, True),
])
def test_which_reply_to_is_allowed(reply_to, allowed, expected):
    assert pub.reply_allowed(reply_to, allowed) is expected


class FakeChannel:
    def __init__(self):
        self.is_open = True
        self.published: list[str] = []

    def add_on_close_callback(self, callback):
        pass

    def basic_publish(self, exchange, routing_key, body, props, mandatory=False):
        assert not mandatory
        self.published.append(routing_key)


class FakeConnection:
    def __init__(self):
        self.is_open = True
        self.is_closed = False
        self.channels_asked = 0
        self.closed = False

    def channel(self, on_open_callback):
        self.channels_asked += 1
        self.on_open = on_open_callback

    def close(self):
        self.closed = True


class FakeLoop:
    def call_later(self, delay, fn):
        raise AssertionError("no reconnect expected")


def _publisher(allow: bool):
    p = pub.Publisher(Broker(), ["amqp://h"], "t", FakeLoop(), lambda blocked: None,
                      allow_reply_queues=allow)
    r = p._replies
    r._connection, r._channel = FakeConnection(), FakeChannel()
    return p, r


def _reply(p, reply_to: str, mid: str = "m1") -> bool:
    return p.reply(reply_to, b"{}", pika.BasicProperties(correlation_id=mid))


def test_a_named_reply_queue_not_allowed_is_warned_about_once(caplog):
    p, r = _publisher(allow=False)
    with caplog.at_level(logging.WARNING, logger="workqd.worker"):
        assert not _reply(p, "tasks\n", "m1")
        assert not _reply(p, "other", "m2")
        assert _reply(p, "amq.rabbitmq.reply-to.abc.def", "m3")
    assert r._channel.published == ["amq.rabbitmq.reply-to.abc.def"]
    warned = [rec.getMessage() for rec in caplog.records]
    assert len(warned) == 1 and "'tasks\\n'" in warned[0] and "m1" in warned[0]
    assert p._connection is None   # replies never open the copies' connection


def test_a_refused_reply_reopens_only_the_reply_channel():
    p, r = _publisher(allow=True)
    conn, first = r._connection, r._channel
    assert _reply(p, "a")
    r._on_channel_closed(first, "NOT_FOUND")    # the broker refused it
    assert conn.channels_asked == 0 and not conn.closed   # nothing waits: nothing reopened
    assert _reply(p, "b")                       # waits for the new channel
    assert conn.channels_asked == 1 and not conn.closed and not p.idle
    second = FakeChannel()
    conn.on_open(second)
    assert second.published == ["b"] and first.published == ["a"] and p.idle


def test_replies_waiting_for_their_connection_are_bounded(caplog):
    p, r = _publisher(allow=True)
    r._connection, r._channel, r._connecting = None, None, True   # (re)connecting
    with caplog.at_level(logging.WARNING, logger="workqd.worker"):
        for n in range(r.BACKLOG_MAX + 5):
            _reply(p, f"q{n}")
    assert len(r._backlog) == r.BACKLOG_MAX and r._backlog[0].routing_key == "q5"
    assert len(caplog.records) == 1 and "dropping the oldest" in caplog.records[0].getMessage()
    channel = FakeChannel()
    r._connection = FakeConnection()
    r._on_channel_open(channel)
    assert len(channel.published) == r.BACKLOG_MAX and p.idle and not r._dropping


def test_a_reply_sent_as_its_connection_opens_reports_the_publisher_idle():
    idle = []
    p = pub.Publisher(Broker(), ["amqp://h"], "t", FakeLoop(), lambda blocked: None,
                      on_idle=lambda: idle.append(p.idle))
    r = p._replies
    r._connection, r._connecting = FakeConnection(), True   # opening
    assert _reply(p, "amq.rabbitmq.reply-to.abc.def")
    assert not p.idle and idle == []                         # waits for the channel
    channel = FakeChannel()
    r._ready(channel)
    assert channel.published == ["amq.rabbitmq.reply-to.abc.def"] and idle == [True]
