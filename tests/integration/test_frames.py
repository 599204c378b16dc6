"""Headers pika cannot decode, from a producer that is not pika, against the real daemon.

The messages are written by tests/rawamqp.py, byte for byte, as a Node.js or
Java client could write them. Before the decode guard (workqd/frames.py) each
one aborted the worker's connection inside pika, came back on the next one, and
did so for ever, with the healthy task behind it never run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

import rawamqp as r
from conftest import BROKER_URL, ROOT, queue_config, wait_for
from workqd import frames

OUTCOME = "workqd_tasks_processed_total"
MS_AS_SECONDS = 1 << 40    # 2004-11-03 in milliseconds; read as seconds, year 36812

# name: (header table, path x-workq-error must name, words of the reason)
BAD = {
    "timestamp": (r.table({"x-foo": r.v_table({"bar": r.v_timestamp(MS_AS_SECONDS)})}),
                  "headers.x-foo.bar", "year 36812 is out of range"),
    "nested": (r.table({"x-deep": r.v_nested(2000)}),
               "headers.x-deep" + ".n" * (frames.MAX_DEPTH - 1), "nested deeper than 64"),
    # pika decodes it; intake's int() did not take it (str.isdigit says yes to "²").
    "attempt": (r.table({"x-workq-attempt": r.v_str("²")}), "x-workq-attempt",
                "whole number"),
}
# RabbitMQ 3.10 refuses these at publish (it parses headers on the way in); a broker
# that lets them through must see them dead-lettered like the others.
REFUSED_BY_SOME_BROKERS = {
    "unknown type": (r.table({"x-u": b"Z\x01\x02"}), "headers.x-u", "unknown field type"),
    "nan double": (r.table({"x-n": r.v_double(float("nan"))}), "headers.x-n",
                   "cannot be decoded"),
}


def publish_raw(queue: str, headers: bytes, body: bytes = b"n=bad sleep=0") -> tuple[str, bool]:
    """(message id, whether the broker took it)."""
    mid = "raw-" + uuid.uuid4().hex[:12]
    try:
        with r.Publisher() as p:
            p.publish(queue, body, r.properties(headers=headers, message_id=mid))
    except r.Refused:
        return mid, False
    return mid, True


def reconnects(d) -> int:
    return d.log().count("reconnecting in")


def assert_malformed_letter(props, mid: str, path: str, why: str) -> None:
    assert props.message_id == mid
    assert not frames.problems(props)    # the copy is plain pika, markers as strings
    assert props.headers["x-workq-reason"] == "malformed"
    error = props.headers["x-workq-error"]
    assert error.startswith(path + ": ") or path in error, error
    assert why in error, error


@pytest.mark.parametrize("kind", [*BAD, *REFUSED_BY_SOME_BROKERS])
def test_an_undecodable_header_is_dead_lettered_and_the_task_behind_it_runs(
        daemon, amqp, qname, kind):
    d = daemon([queue_config(qname, workers=1)])
    table, path, why = {**BAD, **REFUSED_BY_SOME_BROKERS}[kind]
    bad, taken = publish_raw(qname, table)
    assert taken or kind in REFUSED_BY_SOME_BROKERS
    healthy = amqp.publish(qname, "n=healthy sleep=0")
    wait_for(lambda: healthy in d.ledger.ended_ids(), 20,
             what=lambda: f"the healthy task behind the bad one done; log:\n{d.log()[-3000:]}")
    dead = f"{qname}.dead"
    wait_for(lambda: amqp.count(dead) == int(taken), 10, what="the bad one dead-lettered")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == int(taken), 10,
             what="the dead letter counted")
    assert d.metric(OUTCOME, queue=qname, outcome="success") == 1
    assert d.metric("workqd_worker_restarts_total", queue=qname) == 0
    assert reconnects(d) == 0 and d.log().count("consuming from") == 1, d.log()
    assert bad not in {e["id"] for e in d.ledger.events("start")}
    if taken:
        (props, body), = amqp.get_all(dead)
        assert_malformed_letter(props, bad, path, why)
        assert body == b"n=bad sleep=0"
        assert f"task {bad} dead-lettered to {dead} (malformed): " in d.log()
    assert amqp.count(qname) == 0
    assert d.stop() == 0


def test_an_undecodable_header_on_a_quorum_queue(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1, type="quorum")])
    table, path, why = BAD["timestamp"]
    bad, taken = publish_raw(qname, table)
    assert taken
    healthy = amqp.publish(qname, "n=healthy sleep=0")
    wait_for(lambda: healthy in d.ledger.ended_ids(), 20, what="the healthy task done")
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 10, what="the bad one dead-lettered")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 10,
             what="the dead letter counted")
    assert reconnects(d) == 0 and d.metric("workqd_worker_restarts_total", queue=qname) == 0
    (props, _), = amqp.get_all(f"{qname}.dead")
    assert_malformed_letter(props, bad, path, why)
    assert d.stop() == 0


def test_a_header_intake_chokes_on_is_dead_lettered_not_a_crash(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1, handler={"python": "chokefns:work"})])
    bad = amqp.publish(qname, "n=bad sleep=0", headers={"x-test-choke": 1, "x-keep": "k"})
    healthy = amqp.publish(qname, "n=healthy sleep=0")
    wait_for(lambda: healthy in d.ledger.ended_ids(), 20, what="the healthy task done")
    wait_for(lambda: amqp.count(f"{qname}.dead") == 1, 10, what="the bad one dead-lettered")
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 10,
             what="the dead letter counted")
    assert d.metric("workqd_worker_restarts_total", queue=qname) == 0 and reconnects(d) == 0
    assert "internal error" not in d.log()
    (props, _), = amqp.get_all(f"{qname}.dead")
    assert props.message_id == bad and props.headers["x-keep"] == "k"
    assert props.headers["x-workq-reason"] == "malformed"
    assert props.headers["x-workq-error"] == ("headers cannot be read (ValueError: a header "
                                              "value intake did not foresee)")
    assert d.stop() == 0


def test_a_decimal_at_the_edge_of_the_format_is_not_malformed(daemon, amqp, qname):
    # pika decodes every decimal the format can carry (scale 0-255): such a task runs.
    d = daemon([queue_config(qname, workers=1)])
    mid, taken = publish_raw(qname, r.table({"x-d": r.v_decimal(255, -2**31)}),
                             b"n=decimal sleep=0")
    assert taken
    wait_for(lambda: mid in d.ledger.ended_ids(), 20, what="the task with the decimal done")
    assert amqp.count(f"{qname}.dead") == 0 and reconnects(d) == 0
    assert d.stop() == 0


# --- the dead letters, by workqctl dead and workq-submit --requeue-dead ------------------

def run_ctl(config, qname: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workqd.ctl", "-c", str(config), "dead",
                           qname, *args], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_dead_commands_on_malformed_letters(daemon, amqp, qname):
    d = daemon([queue_config(qname, workers=1)])
    dead = f"{qname}.dead"
    table, path, why = BAD["timestamp"]
    repaired, _ = publish_raw(qname, table)
    wait_for(lambda: amqp.count(dead) == 1, 20, what="the worker's malformed dead letter")
    assert d.stop() == 0
    # One that never went through a worker: still undecodable for pika, in .dead itself.
    raw, taken = publish_raw(dead, r.table({"x-deep": r.v_nested(2000)}), b"raw body")
    assert taken

    r_list = run_ctl(d.path, qname, "list", "--json")
    assert r_list.returncode == 0, r_list.stderr
    items = {i["id"]: i for i in json.loads(r_list.stdout)}
    assert set(items) == {repaired, raw}
    assert items[repaired]["reason"] == "malformed" and path in items[repaired]["error"]
    assert items[raw]["reason"] == "malformed"
    assert "headers.x-deep" in items[raw]["error"] and "nested deeper" in items[raw]["error"]
    table_out = run_ctl(d.path, qname, "list")
    assert table_out.returncode == 0 and raw in table_out.stdout
    assert amqp.count(dead) == 2    # listing took nothing

    shown = run_ctl(d.path, qname, "show", raw)
    assert shown.returncode == 0, shown.stderr
    assert "undecodable: headers.x-deep" in shown.stdout and "raw body" in shown.stdout
    shown = run_ctl(d.path, qname, "show", repaired)
    assert shown.returncode == 0 and "header x-workq-reason: malformed" in shown.stdout
    assert "year 36812" in shown.stdout

    moved = run_ctl(d.path, qname, "requeue", "--reason", "malformed", "--id", raw)
    assert moved.returncode == 0 and "moved 1 task(s)" in moved.stderr, moved.stderr
    (props, body), = amqp.get_all(qname)
    assert props.message_id == raw and body == b"raw body" and not frames.problems(props)
    assert "nested deeper than 64" in json.dumps(props.headers)

    purged = run_ctl(d.path, qname, "purge", "--yes")
    assert purged.returncode == 0 and "purged 1" in purged.stderr
    assert amqp.count(dead) == 0


def test_requeue_dead_moves_an_undecodable_letter(amqp, qname):
    amqp.declare(qname, "classic")
    amqp.declare(f"{qname}.dead", "classic")
    table, path, why = BAD["timestamp"]
    mid, taken = publish_raw(f"{qname}.dead", table)
    assert taken
    r_sub = subprocess.run([sys.executable, "-m", "workqd.submit", "--url", BROKER_URL,
                            "--requeue-dead", qname], capture_output=True, text=True,
                           timeout=30, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r_sub.returncode == 0 and "moved 1 task(s)" in r_sub.stderr, r_sub.stderr
    (props, _), = amqp.get_all(qname)
    assert props.message_id == mid and not frames.problems(props)
    assert "year 36812" in props.headers["x-foo"]["bar"]
    assert amqp.count(f"{qname}.dead") == 0
