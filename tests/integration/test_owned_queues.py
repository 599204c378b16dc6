"""Queues owned by others: declare: false, declare_side_queues: false,
arguments:, bindings:. Real broker, real daemon; the queues are made by another client."""

from __future__ import annotations

import pika
import pytest

from conftest import Amqp, queue_config, wait_for
from workqd import exitcodes

OUTCOME = "workqd_tasks_processed_total"


@pytest.fixture
def theirs(amqp, qname):
    """Names of the other team's queues and exchanges, deleted at teardown."""
    made: list[tuple[str, str]] = []
    yield made
    cleanup = Amqp()
    for kind, name in made:
        try:
            if kind == "queue":
                cleanup.channel().queue_delete(name)
            else:
                cleanup.channel().exchange_delete(name)
        except pika.exceptions.AMQPError:
            pass
    cleanup.close()


def test_consumes_the_tutorials_non_durable_hello_queue(daemon, amqp, qname):
    # The tutorial's producer: channel.queue_declare(queue='hello'), non-durable, classic.
    amqp.channel().queue_declare(qname)
    amqp.channel().basic_publish("", qname, b"n=1")
    d = daemon([queue_config(qname, declare=False, handler={"python": "taskfns:work"})])
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 1, 20, what="ran")
    assert len(d.ledger.events("end")) == 1


def test_consumes_a_classic_queue_with_max_length_and_their_dead_lettering(daemon, amqp, qname,
                                                                         theirs):
    dlq = f"{qname}.their-dlq"
    theirs.append(("queue", dlq))
    ch = amqp.channel()
    ch.queue_declare(dlq, durable=True)
    ch.queue_declare(qname, durable=True, arguments={
        "x-max-length": 100, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq})
    ok = amqp.publish(qname, "n=1")
    bad = amqp.publish(qname, "n=2 fail=1")
    d = daemon([queue_config(qname, type="classic", declare=False, declare_side_queues=False,
                             retry={"attempts": 3, "backoff": [1]})])
    assert "retries are off" in d.log()
    wait_for(lambda: amqp.count(dlq) == 1, 20, what="the failed task in their dead-letter queue")
    (props, body), = amqp.get_all(dlq)
    assert props.message_id == bad and body == b"n=2 fail=1"
    assert props.headers["x-death"][0]["reason"] == "rejected"
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 10,
             what="counted")
    assert d.metric(OUTCOME, queue=qname, outcome="success") == 1
    assert [e["attempt"] for e in d.ledger.events("fail")] == [1]   # no retry
    assert {e["id"] for e in d.ledger.events("end")} == {ok}
    assert amqp.count(f"{qname}.dead") == -1   # never declared


def test_a_missing_queue_with_declare_false_stops_the_pool(daemon, qname):
    d = daemon([queue_config(qname, declare=False)], start=False)
    d.start(wait_ready=False)
    assert d.proc.wait(30) == 1
    assert f"queue {qname} does not exist on the broker, and with declare: false" in d.log()
    assert "Traceback" not in d.log()


def test_arguments_with_another_value_name_the_argument(daemon, amqp, qname):
    amqp.channel().queue_declare(qname, durable=True, arguments={"x-queue-type": "classic",
                                                                 "x-max-length": 10})
    d = daemon([queue_config(qname, type="classic", arguments={"x-max-length": 5})], start=False)
    d.start(wait_ready=False)
    assert d.proc.wait(30) == 1
    line, = [l for l in d.log().splitlines() if "exists on the broker with other arguments" in l
             and "worker" in l][:1]
    assert "inequivalent arg 'x-max-length'" in line and f"queue {qname} exists" in line, line


def test_a_priority_queue_runs_high_priority_tasks_first(daemon, amqp, qname):
    args = {"x-queue-type": "classic", "x-max-priority": 10}
    amqp.channel().queue_declare(qname, durable=True, arguments=args)
    low = [amqp.publish(qname, "n=low", priority=1) for _ in range(4)]
    high = [amqp.publish(qname, "n=high", priority=9) for _ in range(4)]
    d = daemon([queue_config(qname, type="classic", workers=1, prefetch=1,
                             arguments={"x-max-priority": 10})])
    wait_for(lambda: len(d.ledger.events("end")) == 8, 30, what="all ran")
    order = [e["id"] for e in d.ledger.events("start")]
    assert set(order[:4]) == set(high) and set(order[4:]) == set(low), order


def test_bindings_route_an_exchanges_messages_to_the_queue(daemon, amqp, qname, theirs):
    exchange = f"{qname}.x"
    theirs.append(("exchange", exchange))
    amqp.channel().exchange_declare(exchange, "topic", durable=True)
    d = daemon([queue_config(qname, bindings=[{"exchange": exchange, "routing_key": "img.*"}])])
    ch = amqp.channel()
    ch.basic_publish(exchange, "img.png", b"n=1",
                     pika.BasicProperties(message_id="routed"), mandatory=True)
    wait_for(lambda: "routed" in d.ledger.ended_ids(), 20, what="the routed task ran")


def test_bindings_to_a_missing_exchange_stop_the_pool(daemon, qname):
    d = daemon([queue_config(qname, bindings=[{"exchange": f"{qname}.nowhere"}])], start=False)
    d.start(wait_ready=False)
    assert d.proc.wait(30) == 1
    assert f"exchange '{qname}.nowhere', which does not exist" in d.log()


# --- what --check refuses (pure: config.parse) ---------------------------------------

def _problems(**queue) -> list[str]:
    from workqd import config
    try:
        config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}, **queue}]}, "w.yaml")
    except config.ConfigError as e:
        return e.problems
    return []


@pytest.mark.parametrize("name", ["x-queue-type", "x-dead-letter-exchange",
                                  "x-dead-letter-routing-key", "x-delivery-limit",
                                  "x-message-ttl"])
def test_check_refuses_the_arguments_workqd_owns(name):
    problem, = _problems(type="classic", arguments={name: "x"})
    assert problem.startswith(f"w.yaml: queues[0].arguments.{name}: is set by workqd itself")


def test_check_refuses_arguments_that_do_not_fit_the_queue():
    assert "is set by workqd itself" in _problems(arguments={"x-overflow": "drop-head"})[0]
    assert _problems(type="classic", arguments={"x-overflow": "drop-head"}) == []
    assert "classic queues only" in _problems(arguments={"x-max-priority": 5})[0]
    assert "at most 255" in _problems(type="classic", arguments={"x-max-priority": 300})[0]
    assert "has no effect with declare: false" in _problems(
        declare=False, arguments={"x-max-length": 5})[0]
    assert "named x-" in _problems(arguments={"max-length": 5})[0]
    assert "must be a string" in _problems(arguments={"x-foo": [1]})[0]
    assert "needs declare: false or type: classic" in _problems(declare_side_queues=False)[0]
    assert "must be true or false" in _problems(declare="no")[0]


def test_check_refuses_bad_bindings():
    assert "cannot be bound" in _problems(bindings=[{"exchange": ""}])[0]
    assert "exchange: is required" in _problems(bindings=[{"routing_key": "a"}])[0]
    assert "unknown key" in _problems(bindings=[{"exchange": "e", "key": "a"}])[0]
    assert _problems(bindings=[{"exchange": "amq.topic", "routing_key": "a.#"}]) == []


# --- what the worker declares, and what it says when the broker refuses (pure) ----------

def _queue(**keys):
    from workqd import config
    return config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}, **keys}]},
                        "w.yaml").queues[0]


def test_declarations_follow_declare_and_declare_side_queues():
    from workqd import broker, config, delays
    steps = broker.declarations(_queue(declare=False, bindings=[{"exchange": "e",
                                                                 "routing_key": "k"}]))
    queues = [s for s in steps if isinstance(s, broker.Declaration)]
    assert [(s.name, s.passive, s.arguments) for s in queues] == [
        ("q", True, {}), ("q.dead", False, {"x-queue-type": "quorum"})]
    # Retries wait in the shared delay levels, bound to this queue: no queue per delay.
    assert delays.delivery_binding("q") in steps
    assert steps[-1] == config.Binding("e", "k")
    only = broker.declarations(_queue(declare=False, declare_side_queues=False))
    assert [(s.name, s.passive) for s in only] == [("q", True)]
    mine = broker.declarations(_queue(type="classic", arguments={"x-max-priority": 10}))
    assert mine[0].arguments == {"x-max-priority": 10, "x-queue-type": "classic"}


def test_refusals_while_declaring_name_what_is_missing_or_different():
    from workqd import broker, config
    from workqd.worker.session import classify_channel_close
    q = _queue(declare=False)
    passive = broker.declarations(q)[0]
    v = classify_channel_close(404, "NOT_FOUND - no queue 'q'", True, q, passive)
    assert v.exit_code == exitcodes.WORKER_QUEUE_MISSING and "queue q does not exist" in v.why
    v = classify_channel_close(404, "NOT_FOUND - no exchange 'e'", True, q, config.Binding("e"))
    assert "exchange 'e', which does not exist" in v.why and v.exit_code is not None
    mine = broker.declarations(_queue(type="classic", arguments={"x-max-length": 5}))[0]
    v = classify_channel_close(406, "PRECONDITION_FAILED - inequivalent arg 'x-max-length'", True,
                               q, mine)
    assert "inequivalent arg 'x-max-length'" in v.why and "{'x-max-length': 5" in v.why
    # Not declaring: a 404 is a queue that may come back.
    assert classify_channel_close(404, "NOT_FOUND", False, q, None).exit_code is None


def test_submit_with_the_config_of_a_declare_false_queue_checks_it_passively(amqp, tmp_path):
    import subprocess
    import sys
    import uuid
    import yaml
    from conftest import BROKER_URL
    name = f"t.hello.{uuid.uuid4().hex[:6]}"
    amqp.channel().queue_declare(name, durable=False)   # the tutorial's own producer
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({"broker": {"url": BROKER_URL}, "queues": [
            {"name": name, "declare": False, "declare_side_queues": False,
             "handler": {"python": "taskfns:work"}}]}))
        r = subprocess.run([sys.executable, "-m", "workqd.submit", "-c", str(cfg), "hello"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert amqp.count(name) == 1
    finally:
        amqp.delete(name)
