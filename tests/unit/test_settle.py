"""Settlement logic against a fake channel: no broker, no processes, a few milliseconds.

The settler decides which frames the broker sees; these tests pin down the
rules that keep a task from being acked before it is done: a coalesced
multiple-ack never covers an unsettled or unconfirmed delivery, a refused or
returned copy gives the original back, a lost channel sends nothing more.
"""

from __future__ import annotations

import datetime
import types

import pika
import pika.spec
import pytest

from workqd import config, vocab
from workqd.runner import Task
from workqd.worker.policy import decide
from workqd.worker import publisher as pub
from workqd.worker.settle import Settler


class FakeChannel:
    def __init__(self):
        self.is_open = True
        self.frames: list[tuple] = []

    def basic_ack(self, tag, multiple=False):
        self.frames.append(("ack", tag, multiple))

    def basic_nack(self, tag, requeue=True):
        self.frames.append(("nack", tag, requeue))

    def basic_publish(self, exchange, routing_key, body, props, mandatory=False):
        self.frames.append(("publish", routing_key, props.message_id or props.correlation_id,
                            mandatory))

    def acks(self):
        return [f for f in self.frames if f[0] == "ack"]


class FakePublisher:
    """Records publishes; the test confirms them by hand."""

    def __init__(self, channel):
        self.channel = channel
        self.waiting = []   # done callbacks, in publish order
        self.exchanges = []   # the exchange of each publish, in order

    def publish(self, routing_key, body, props, mandatory, done, wanted, exchange=""):
        self.exchanges.append(exchange)
        self.channel.frames.append(("publish", routing_key, props.message_id or props.correlation_id,
                                    mandatory))
        if done is not None:
            self.waiting.append(done)

    def reply(self, reply_to, body, props):
        self.publish(reply_to, body, props, False, None, None)


class FakeLoop:
    """Timers run only when the test says so."""

    def __init__(self):
        self.timers = {}
        self._next = 0

    def call_later(self, delay, fn):
        self._next += 1
        self.timers[self._next] = fn
        return self._next

    def remove_timeout(self, handle):
        self.timers.pop(handle, None)

    def run_timers(self):
        while self.timers:
            _, fn = self.timers.popitem()
            fn()


class Events:
    def __init__(self):
        self.settled, self.unsettled = [], []

    def on_settled(self, d, metric):
        self.settled.append((d.tag, metric))

    def on_unsettled(self, d, why):
        self.unsettled.append((d.tag, why))


QUEUE = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"},
                                  "retry": {"attempts": 2, "backoff": [5]}}]}, "t.yaml").queues[0]


def props(mid="m", reply_to=None):
    return pika.BasicProperties(message_id=mid, reply_to=reply_to, headers={})


def make(batch=4, idle=False):
    ch, loop, ev = FakeChannel(), FakeLoop(), Events()
    s = Settler(ch, loop, batch, lambda: idle, ev, FakePublisher(ch))
    return s, ch, loop, ev


def delivery(s, tag, attempt=1):
    d = s.receive(tag, b"body", props(f"m{tag}"), Task(f"m{tag}", "q", {}, False, 0, attempt))
    return d


def confirm(s, result=pub.CONFIRMED, index=0):
    s._publisher.waiting.pop(index)(result)


def failed(d):
    return decide(QUEUE, d.task.attempt, d.task.headers, vocab.RETRY, "boom")


def test_successes_in_a_row_share_one_multiple_ack():
    s, ch, loop, _ = make(batch=4)
    ds = [delivery(s, t) for t in (1, 2, 3, 4)]
    for d in ds:
        assert s.ack(d)
    assert ch.acks() == [("ack", 4, True)]


def test_coalesced_ack_never_covers_a_delivery_still_running():
    s, ch, loop, _ = make(batch=2)
    d1, d2, d3 = (delivery(s, t) for t in (1, 2, 3))
    s.ack(d1)
    s.ack(d3)   # d2 still runs
    assert ("ack", 3, True) not in ch.frames
    assert ch.acks() == [("ack", 1, False), ("ack", 3, False)]


def test_coalesced_ack_never_covers_a_copy_awaiting_its_confirm():
    s, ch, loop, ev = make(batch=2)
    d1, d2, d3 = (delivery(s, t) for t in (1, 2, 3))
    assert s.publish_copy(d1, failed(d1))   # a retry copy, unconfirmed
    s.ack(d2)
    s.ack(d3)
    assert all(not multiple for _, _, multiple in ch.acks()), ch.frames
    assert ("ack", 1, False) not in ch.frames
    confirm(s)
    assert ("ack", 1, False) in ch.frames and ev.settled == [(1, vocab.RETRY)]


def test_idle_handler_flushes_at_the_end_of_the_loop_turn():
    s, ch, loop, _ = make(batch=50, idle=True)
    d1, d2 = delivery(s, 1), delivery(s, 2)
    s.ack(d1)
    s.ack(d2)
    assert ch.acks() == []          # waiting for the end of this loop iteration
    loop.run_timers()
    assert ch.acks() == [("ack", 2, True)]


def test_refused_copy_requeues_the_original():
    s, ch, loop, ev = make()
    d = delivery(s, 7)
    s.publish_copy(d, failed(d))
    confirm(s, pub.REFUSED)
    assert ("nack", 7, True) in ch.frames and not ch.acks()
    assert ev.settled == [] and ev.unsettled == [(7, "copy refused")]


def test_returned_copy_gives_the_original_back():
    s, ch, loop, ev = make()
    d = delivery(s, 3)
    s.publish_copy(d, failed(d))
    confirm(s, pub.RETURNED)
    assert ("nack", 3, True) in ch.frames and not ch.acks()
    assert ev.settled == [] and ev.unsettled == [(3, "copy unroutable")]


def test_copy_lost_with_the_publishing_connection_gives_the_original_back():
    s, ch, loop, ev = make()
    d1, d2 = delivery(s, 1), delivery(s, 2)
    s.publish_copy(d1, failed(d1))
    s.publish_copy(d2, failed(d2))
    confirm(s, pub.CONFIRMED)
    confirm(s, pub.LOST)
    assert ev.settled == [(1, vocab.RETRY)] and ev.unsettled == [(2, "copy lost")]
    assert ("ack", 1, False) in ch.frames and ("nack", 2, True) in ch.frames


def test_confirm_after_the_consuming_channel_closed_acks_nothing():
    s, ch, loop, ev = make()
    d = delivery(s, 5)
    s.publish_copy(d, failed(d))
    s.close()
    ch.is_open = False
    confirm(s)
    assert not ch.acks() and ev.settled == []


def test_lost_channel_drops_pending_acks_and_refuses_new_ones():
    s, ch, loop, ev = make(batch=10)
    d1, d2 = delivery(s, 1), delivery(s, 2)
    s.ack(d1)            # coalesced, not sent yet
    s.publish_copy(d2, failed(d2))
    s.close()
    ch.is_open = False
    loop.run_timers()
    s.flush()
    assert ch.acks() == []
    d3 = delivery(s, 3)
    assert not s.ack(d3)
    assert not s.publish_copy(d3, failed(d3))
    assert not s.pending


def test_reply_follows_the_settlement_and_is_never_mandatory():
    s, ch, loop, ev = make(batch=1)
    d = s.receive(1, b"x", props("m1", reply_to="amq.rabbitmq.reply-to.abc"),
                  Task("m1", "q", {}, False, 0, 1))
    s.ack(d)
    s.reply(d, "success", True)
    assert ch.frames == [("ack", 1, False), ("publish", "amq.rabbitmq.reply-to.abc", "m1", False)]


# --- the policy ------------------------------------------------------------------

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


def test_policy_retry_then_dead_letter():
    first = decide(QUEUE, 1, {"x-delivery-count": 2, "k": "v"}, vocab.RETRY, "boom", now=NOW)
    assert (first.target, first.metric, first.final, first.delay) == ("q", vocab.RETRY, False, 5)
    assert first.headers == {"k": "v", vocab.H_ATTEMPT: 2, vocab.H_ERROR: "boom"}
    last = decide(QUEUE, 2, {}, vocab.RETRY, "boom", now=NOW)
    assert (last.target, last.metric, last.final) == ("q.dead", vocab.DEAD_LETTER, True)
    assert last.headers[vocab.H_REASON] == "failed"
    assert last.headers[vocab.H_DEAD_AT] == "2026-01-02T03:04:05+00:00"


@pytest.mark.parametrize("reason", ["poison", "too-large", "malformed"])
def test_policy_refusals_are_never_retried(reason):
    s = decide(QUEUE, 1, {}, vocab.DEAD_LETTER, "why", reason=reason, now=NOW)
    assert s.target == "q.dead" and s.headers[vocab.H_REASON] == reason and s.final


def test_policy_timeout_is_counted_as_timeout_both_ways():
    assert decide(QUEUE, 1, {}, vocab.TIMEOUT, "slow").metric == vocab.TIMEOUT
    last = decide(QUEUE, 2, {}, vocab.TIMEOUT, "slow")
    assert last.metric == vocab.TIMEOUT and last.headers[vocab.H_REASON] == "timeout"


def test_policy_cuts_long_errors():
    s = decide(QUEUE, 2, {}, vocab.RETRY, "x" * 5000)
    assert len(s.headers[vocab.H_ERROR]) == vocab.MAX_ERROR_TEXT


# --- the publishing connection ------------------------------------------------

def _publisher():
    from workqd.config import Broker
    blocked = []
    p = pub.Publisher(Broker(), ["amqp://h"], "t", FakeLoop(), blocked.append)
    p._channel = FakeChannel()
    return p, blocked


def _publish(p, mid, results, routing_key="q.dead"):
    p.publish(routing_key, b"x", pika.BasicProperties(message_id=mid), True,
              done=results.append, wanted=lambda: True)


def _frame(method):
    return types.SimpleNamespace(method=method)


def test_publisher_reports_each_confirm_once_and_spots_returns():
    p, _ = _publisher()
    results = []
    for mid in ("a", "b", "c"):
        _publish(p, mid, results)
    p._on_return(p._channel, types.SimpleNamespace(routing_key="q.dead", exchange=""),
                 pika.BasicProperties(message_id="b"), b"x")
    p._on_confirm(_frame(pika.spec.Basic.Ack(3, True)))
    assert results == [pub.CONFIRMED, pub.RETURNED, pub.CONFIRMED] and p.idle


def test_publisher_nack_and_lost_connection_are_reported():
    p, blocked = _publisher()
    results = []
    _publish(p, "a", results)
    _publish(p, "b", results)
    p._on_confirm(_frame(pika.spec.Basic.Nack(1, False)))
    p._set_blocked(True)
    p._closing = True          # no reconnect in a unit test
    p._on_closed(None, "gone")
    assert results == [pub.REFUSED, pub.LOST]
    assert blocked == [True, False] and not p.blocked and p.idle


def test_policy_a_rejected_task_is_dead_lettered_with_attempts_left():
    # QUEUE allows more attempts: a handler's Reject (or exit 65) skips them all.
    s = decide(QUEUE, 1, {"k": "v"}, vocab.DEAD_LETTER, "Reject: bad input", now=NOW)
    assert (s.target, s.metric, s.final) == ("q.dead", vocab.DEAD_LETTER, True)
    assert s.headers[vocab.H_REASON] == vocab.REASON_REJECTED == "rejected"
    assert s.headers[vocab.H_ATTEMPT] == 1 and s.headers["k"] == "v"
    assert "rejected" in vocab.DEAD_LETTER_REASONS


def test_policy_a_deferral_keeps_the_try_and_is_bounded():
    q = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"},
                                  "retry": {"attempts": 2, "backoff": [5, 30],
                                            "max_deferrals": 2}}]}, "t.yaml").queues[0]
    s = decide(q, 1, {"k": "v", "x-delivery-count": 1}, vocab.DEFERRED, "db down", now=NOW)
    assert (s.target, s.metric, s.final, s.delay) == ("q", vocab.DEFERRED, False, 5)
    assert s.headers == {"k": "v", vocab.H_ATTEMPT: 1, vocab.H_DEFERRALS: 1,
                         vocab.H_ERROR: "db down"}
    s = decide(q, 1, s.headers, vocab.DEFERRED, "db down", now=NOW)
    assert (s.metric, s.headers[vocab.H_ATTEMPT], s.headers[vocab.H_DEFERRALS]) == (
        vocab.DEFERRED, 1, 2)
    # Out of deferrals: a failed try like any other (try 2 next), still counting 2.
    s = decide(q, 1, s.headers, vocab.DEFERRED, "db down", now=NOW)
    assert (s.target, s.metric, s.headers[vocab.H_ATTEMPT], s.delay) == ("q", vocab.RETRY, 2, 5)
    assert "deferred 2 time(s)" in s.headers[vocab.H_ERROR]
    # A deferral of the last try waits the delay after it, then the last try runs again.
    s = decide(q, 2, {vocab.H_DEFERRALS: 0}, vocab.DEFERRED, "db down", now=NOW)
    assert (s.target, s.headers[vocab.H_ATTEMPT], s.delay) == ("q", 2, 30)
    s = decide(q, 2, {vocab.H_DEFERRALS: 2}, vocab.DEFERRED, "db down", now=NOW)
    assert (s.target, s.metric, s.headers[vocab.H_REASON]) == ("q.dead", vocab.DEAD_LETTER,
                                                              "failed")


@pytest.mark.parametrize("bogus", ["3", -1, True, 2.5, [1]])
def test_policy_an_unreadable_deferral_count_allows_no_more(bogus):
    s = decide(QUEUE, 1, {vocab.H_DEFERRALS: bogus}, vocab.DEFERRED, "later", now=NOW)
    assert s.metric == vocab.RETRY and s.headers[vocab.H_ATTEMPT] == 2


def test_policy_max_deferrals_0_makes_a_deferral_a_failure():
    q = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"},
                                  "retry": {"attempts": 2, "max_deferrals": 0}}]},
                     "t.yaml").queues[0]
    assert decide(q, 1, {}, vocab.DEFERRED, "later").metric == vocab.RETRY


def test_policy_without_side_queues_rejects_to_the_broker_and_never_retries():
    q = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}, "type": "classic",
                                  "declare": False, "declare_side_queues": False,
                                  "retry": {"attempts": 5}}]}, "t.yaml").queues[0]
    for outcome, metric in ((vocab.RETRY, vocab.DEAD_LETTER), (vocab.TIMEOUT, vocab.TIMEOUT),
                            (vocab.DEAD_LETTER, vocab.DEAD_LETTER)):
        s = decide(q, 1, {}, outcome, "boom")
        assert (s.reject, s.target, s.metric, s.final) == (True, None, metric, True)
    assert decide(q, 1, {}, vocab.SUCCESS, "").reject is False


def test_a_reject_is_one_nack_without_requeue_and_never_covered_by_a_multiple_ack():
    s, ch, loop, ev = make(batch=4)
    d1, d2, d3 = delivery(s, 1), delivery(s, 2), delivery(s, 3)
    s.ack(d1)
    assert s.reject(d2)
    s.ack(d3)
    s.flush()
    # RabbitMQ's multiple-ack covers outstanding deliveries only: the nacked 2 is settled.
    assert ch.frames == [("nack", 2, False), ("ack", 3, True)]
    assert not s.pending
    s.close()
    ch.is_open = False
    assert not s.reject(delivery(s, 4))
