"""The worker's intake (workqd.worker.intake) and the metadata a handler gets
(workqd.runner.metadata): someone else's deliveries, never an exception. No broker."""

from __future__ import annotations

import pika
from hypothesis import given, settings, strategies as st

from workqd import vocab
from workqd.worker import intake


def test_malformed_attempt_header_is_named_not_raised():
    for bad in ("abc", [1], 0, -3, 10**12, 1.5, True, {"a": 1}, b"\xff"):
        task, problem = intake.read_task("q", False, pika.BasicProperties(
            headers={vocab.H_ATTEMPT: bad}), b"x")
        assert problem and vocab.H_ATTEMPT in problem and task.attempt == 1, bad


def test_unreadable_delivery_count_falls_back_to_zero():
    task, problem = intake.read_task("q", True, pika.BasicProperties(
        headers={"x-delivery-count": "zz"}), b"x")
    assert problem is None and task.delivery_count == 0


def test_numeric_string_attempt_is_accepted():
    task, problem = intake.read_task("q", False, pika.BasicProperties(
        headers={vocab.H_ATTEMPT: "2"}), b"x")
    assert problem is None and task.attempt == 2


_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text()
                       | st.binary(), lambda inner: st.lists(inner) | st.dictionaries(
                           st.text(), inner), max_leaves=10)


@settings(max_examples=150, deadline=None)
@given(headers=st.one_of(st.none(), st.dictionaries(
    st.sampled_from([vocab.H_ATTEMPT, "x-delivery-count", "x-death", "k"]) | st.text(),
    _VALUES, max_size=5)), mid=st.one_of(st.none(), st.text()), body=st.binary(max_size=64),
    redelivered=st.booleans())
def test_intake_never_raises(headers, mid, body, redelivered):
    task, problem = intake.read_task("q", redelivered, pika.BasicProperties(
        headers=headers, message_id=mid), body)
    assert isinstance(task.message_id, str) and task.message_id
    assert isinstance(task.attempt, int) and task.attempt >= 1
    assert isinstance(task.delivery_count, int) and task.delivery_count >= 0
    assert problem is None or isinstance(problem, str)


_PROPS = st.fixed_dictionaries({}, optional={
    "content_type": st.text(), "priority": st.integers(0, 255), "timestamp": st.integers(0, 2**40),
    "correlation_id": st.text(), "app_id": st.text(), "type": st.text()})


@settings(max_examples=150, deadline=None)
@given(headers=st.dictionaries(st.text(), _VALUES | st.datetimes() | st.decimals(), max_size=5),
       props=_PROPS, routing_key=st.one_of(st.none(), st.text(), st.binary()),
       exchange=st.one_of(st.text(), st.none()))
def test_metadata_of_any_delivery_is_json(headers, props, routing_key, exchange):
    import json
    from workqd import runner
    task, _ = intake.read_task("q", False, pika.BasicProperties(headers=headers, **props), b"x",
                               routing_key, exchange)
    assert isinstance(task.routing_key, str) and isinstance(task.exchange, str)
    doc = json.loads(runner.metadata(task))
    assert doc["queue"] == "q" and doc["properties"] == json.loads(json.dumps(props))
    assert set(doc["headers"]) == {str(k) for k in headers}


def test_metadata_makes_headers_json_safe():
    import datetime
    import decimal
    import json
    from workqd import runner
    task, _ = intake.read_task("q", True, pika.BasicProperties(headers={
        "bin": b"\xffok", "when": datetime.datetime(2026, 1, 2, 3, 4, 5), "d": decimal.Decimal("1.5"),
        "nested": {"list": [1, b"a", None]}, "inf": float("inf")}, priority=7), b"x",
        "thumbs.big", "uploads")
    doc = json.loads(runner.metadata(task))
    assert doc["headers"] == {"bin": "\ufffdok", "when": "2026-01-02T03:04:05", "d": "1.5",
                              "nested": {"list": [1, "a", None]}, "inf": "inf"}
    assert (doc["routing_key"], doc["exchange"], doc["redelivered"]) == ("thumbs.big", "uploads",
                                                                        True)
    assert doc["properties"] == {"priority": 7}
