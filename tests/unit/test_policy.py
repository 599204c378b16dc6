"""Retries, deferrals, expiry and early arrivals on the delay levels: pure logic, no broker.

The policy names the work queue and a delay; the settler turns a delay into a
publish to a level's exchange with the delay's bits as routing key, leaving the
broker's dead-letter history behind so that a task retried many times through
the same level is never dropped as a dead-letter cycle.
"""

from __future__ import annotations

import time

import pika
import pytest

from workqd import broker, config, delays, vocab
from workqd.runner import Task
from workqd.task import RetryLater
from workqd.worker import timing
from workqd.worker.policy import decide, postpone
from workqd.worker.session import classify_channel_close

from .test_settle import make

DEATH = {"x-death": [{"queue": "workq.delay.00", "reason": "expired", "count": 3}],
         "x-first-death-queue": "workq.delay.00", "x-last-death-reason": "expired"}


def _queue(**keys):
    return config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}, **keys}]},
                        "t.yaml").queues[0]


def test_any_backoff_value_retries_into_the_work_queue_after_its_delay():
    q = _queue(retry={"attempts": 4, "backoff": [0.25, 7, 3600]})
    for attempt, delay in ((1, 0.25), (2, 7), (3, 3600)):
        s = decide(q, attempt, {}, vocab.RETRY, "boom")
        assert (s.target, s.delay, s.metric, s.final) == ("q", delay, vocab.RETRY, False)
        assert s.headers[vocab.H_ATTEMPT] == attempt + 1
    no_wait = decide(_queue(retry={"attempts": 2, "backoff": [0]}), 1, {}, vocab.RETRY, "x")
    assert (no_wait.target, no_wait.delay) == ("q", 0)


def test_a_handler_chosen_deferral_overrides_the_backoff():
    q = _queue(retry={"attempts": 2, "backoff": [5], "max_deferrals": 3})
    s = decide(q, 1, {}, vocab.DEFERRED, "later", defer_for=90.0)
    assert (s.target, s.delay, s.metric, s.headers[vocab.H_DEFERRALS]) == (
        "q", 90.0, vocab.DEFERRED, 1)
    assert decide(q, 1, {}, vocab.DEFERRED, "later").delay == 5


def test_retry_later_takes_a_delay_in_seconds_and_refuses_nonsense():
    assert RetryLater("db down").delay is None
    e = RetryLater("db down", delay=12)
    assert e.delay == 12.0 and e.args == ("db down",)
    assert RetryLater(delay=10 ** 12).delay == 100 * 366 * 86400
    for bad in (-1, float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError):
            RetryLater("x", delay=bad)


@pytest.mark.parametrize("side_queues", [True, False])
def test_expired_and_cancelled_are_outcomes_of_their_own(side_queues):
    keys = {"retry": {"attempts": 5}}
    if not side_queues:
        keys.update(type="classic", declare=False, declare_side_queues=False)
    q = _queue(**keys)
    for reason, metric in ((vocab.REASON_EXPIRED, vocab.EXPIRED),
                           (vocab.REASON_CANCELLED, vocab.CANCELLED)):
        s = decide(q, 1, {}, vocab.DEAD_LETTER, "late", reason)
        assert (s.metric, s.final) == (metric, True)
        if side_queues:
            assert s.target == "q.dead" and s.headers[vocab.H_REASON] == reason
        else:
            assert s.reject
    assert vocab.OUTCOMES[vocab.EXPIRED] == "expired"
    assert vocab.OUTCOMES[vocab.CANCELLED] == "cancelled"
    # Appended: the shared-memory counters of earlier outcomes keep their places.
    assert vocab.OUTCOMES[:5] == ("success", "retry", "dead_letter", "timeout", "deferred")


def test_an_early_task_is_postponed_unrun_and_uncounted():
    s = postpone(_queue(), {"k": "v", vocab.H_DELIVERY_COUNT: 2, delays.H_DUE_MS: 5000}, 3.5,
                 5000)
    assert (s.metric, s.target, s.delay, s.due_ms, s.final) == (None, "q", 3.5, 5000, False)
    assert s.headers == {"k": "v", delays.H_DUE_MS: 5000}


def test_the_clock_sends_tasks_round_or_to_the_dead_letters():
    now = 1_000_000
    assert timing.judge({vocab.H_EXPIRES_MS: now - 1}, now).kind == timing.EXPIRED
    v = timing.judge({delays.H_DUE_MS: now + 3000}, now)
    assert (v.kind, v.seconds_left, v.due_ms) == (timing.EARLY, 3.0, now + 3000)


def _publish(s, settlement, headers):
    d = s.receive(1, b"body", pika.BasicProperties(message_id="m1", headers=headers),
                  Task("m1", "q", headers, False, 0, 1))
    assert s.publish_copy(d, settlement)
    return d


def test_a_delayed_copy_enters_the_levels_without_its_death_history():
    s, ch, loop, ev = make()
    headers = {"k": "v", **DEATH}
    settlement = decide(_queue(retry={"attempts": 3, "backoff": [5]}), 1, headers,
                        vocab.RETRY, "boom")
    _publish(s, settlement, headers)
    publisher = s._publisher
    # 5 = 0b101: level 2 first, the highest it needs.
    assert publisher.exchanges == ["workq.delay.02"]
    (frame,) = [f for f in ch.frames if f[0] == "publish"]
    assert frame[1] == delays.routing_key(5)
    publisher.waiting[0]("confirmed")
    assert ev.settled == [(1, vocab.RETRY)] and ch.acks() == [("ack", 1, False)]


def test_the_copy_headers_carry_the_destination_and_due_time():
    sent = []

    class Recorder:
        def publish(self, routing_key, body, props, mandatory, done, wanted, exchange=""):
            sent.append((exchange, routing_key, props.headers))

    s, ch, loop, ev = make()
    s._publisher = Recorder()
    headers = {"k": "v", **DEATH}
    before = int(time.time() * 1000)
    _publish(s, decide(_queue(retry={"attempts": 3, "backoff": [1.2]}), 1, headers,
                       vocab.RETRY, "boom"), headers)
    (exchange, key, h), = sent
    # 1.2 s rounds up to 2 whole seconds: never early.
    assert (exchange, key) == ("workq.delay.01", delays.routing_key(2))
    assert not set(h) & set(delays.DEATH_HEADERS)
    assert h[delays.H_TO] == "q" and h["k"] == "v" and h[vocab.H_ATTEMPT] == 2
    assert before + 1200 <= h[delays.H_DUE_MS] <= int(time.time() * 1000) + 1200
    # A dead letter goes straight to its queue, history and all.
    sent.clear()
    s2, *_ = make()
    s2._publisher = Recorder()
    _publish(s2, decide(_queue(), 1, headers, vocab.DEAD_LETTER, "bad"), headers)
    assert sent[0][:2] == ("", "q.dead") and "x-death" in sent[0][2]


def test_a_postponed_copy_keeps_its_due_time_and_is_not_an_outcome():
    s, ch, loop, ev = make()
    due = int(time.time() * 1000) + 60_000
    _publish(s, postpone(_queue(), {delays.H_DUE_MS: due}, 60.0, due), {delays.H_DUE_MS: due})
    s._publisher.waiting[0]("confirmed")
    assert ev.settled == [(1, None)] and ch.acks() == [("ack", 1, False)]
    # No reply for --wait: the task has not run.
    assert [f for f in ch.frames if f[0] == "publish" and f[1].startswith("amq.")] == []


def test_side_queues_mean_the_levels_and_the_delivery_binding_not_a_queue_per_delay():
    items = broker.declarations(_queue(retry={"attempts": 3, "backoff": [5, 30]}))
    names = [getattr(i, "name", None) for i in items]
    assert names[:2] == ["q", "q.dead"]
    assert not [n for n in names if n and ".delay." in n and n.startswith("q")]
    exchanges, levels, binds = delays.topology()
    assert [i for i in items if isinstance(i, delays.Level)] == levels
    assert items[-1] == delays.delivery_binding("q")
    bare = broker.declarations(_queue(type="classic", declare=False, declare_side_queues=False))
    assert [getattr(i, "name", None) for i in bare] == ["q"]


def test_a_level_in_another_shape_is_named_when_the_broker_refuses_it():
    q = _queue()
    level = delays.topology()[1][3]
    v = classify_channel_close(406, "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl'",
                               True, q, level)
    assert "delay level workq.delay.03" in v.why and v.exit_code is not None
