"""workqd.client against the real broker: confirmed submits from threads and forked
processes, refusals that raise instead of hanging, delays that are never early."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid

import pytest

from conftest import BROKER_URL, wait_for
from workqd import delays, vocab
from workqd.client import Client, SubmitError
from workqd.msgid import stamp_ms


@pytest.fixture
def client(broker):
    c = Client(BROKER_URL, confirm_timeout=10)
    yield c
    c.close()


def test_a_submit_returns_once_confirmed_with_the_headers_workqd_reads(client, amqp, qname):
    amqp.declare(qname)
    mid = client.submit(b"hello", queue=qname, headers={"kind": "demo"}, expires=600)
    ((props, body),) = wait_for(lambda: amqp.get_all(qname), 5, what="the task")
    assert body == b"hello" and props.message_id == mid and props.delivery_mode == 2
    assert props.headers["kind"] == "demo"
    # The id it made carries the publish time (workqd.msgid), so no header does.
    assert vocab.H_SUBMITTED_MS not in props.headers
    sent = stamp_ms(mid, int(time.time() * 1000))
    assert sent is not None and abs(sent / 1000 - time.time()) < 60
    assert props.headers[vocab.H_EXPIRES_MS] > sent + 590_000
    # An id the application chose says nothing of time: the header does.
    chosen = client.submit(b"again", queue=qname, message_id="order-42")
    ((props, _),) = wait_for(lambda: amqp.get_all(qname), 5, what="the second task")
    assert props.message_id == chosen == "order-42"
    assert abs(props.headers[vocab.H_SUBMITTED_MS] / 1000 - time.time()) < 60


def test_an_unroutable_task_raises_at_once(client):
    start = time.monotonic()
    with pytest.raises(SubmitError, match="unroutable"):
        client.submit(b"x", queue=f"no-such-queue-{uuid.uuid4().hex}")
    assert time.monotonic() - start < 5


def test_an_unreachable_broker_raises_within_the_confirm_timeout(broker):
    c = Client("amqp://guest:guest@127.0.0.1:1/%2F", confirm_timeout=3)
    start = time.monotonic()
    with pytest.raises(SubmitError, match="cannot connect"):
        c.submit(b"x", queue="tasks")
    assert time.monotonic() - start < 15


def test_threads_share_one_client_and_every_task_is_confirmed_once(client, amqp, qname):
    amqp.declare(qname)
    ids, errors = [], []

    def submit_some(k):
        try:
            for i in range(250):
                ids.append(client.submit(f"{k}-{i}", queue=qname))
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=submit_some, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(set(ids)) == 2000
    bodies = wait_for(lambda: (lambda got: got if len(got) >= 2000 else None)(
        [b for _, b in amqp.get_all(qname)]), 30, what="2000 tasks")
    assert sorted(bodies) == sorted(f"{k}-{i}".encode() for k in range(8) for i in range(250))


def _child(client, qname, k, conn):
    try:
        conn.send([client.submit(f"p{k}-{i}", queue=qname) for i in range(250)])
    except Exception as e:
        conn.send(repr(e))


def test_a_client_used_before_a_fork_works_in_every_child(client, amqp, qname):
    amqp.declare(qname)
    client.submit(b"parent", queue=qname)   # the parent's connection is open at the fork
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for k in range(4):
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=_child, args=(client, qname, k, child_end))
        p.start()
        pipes.append(parent_end)
        procs.append(p)
    results = [end.recv() if end.poll(120) else "no answer" for end in pipes]
    for p in procs:
        p.join(30)
    assert all(isinstance(r, list) and len(r) == 250 for r in results), results
    client.submit(b"parent again", queue=qname)   # the parent's own connection still works
    got = wait_for(lambda: (lambda g: g if len(g) >= 1002 else None)(amqp.get_all(qname)), 30,
                   what="1002 tasks")
    assert len(got) == 1002


def test_delayed_tasks_arrive_when_due_and_never_early(client, amqp, qname):
    amqp.declare(qname)
    sent = {}
    for d in (1, 2, 3.5):
        sent[client.submit(str(d), queue=qname, delay=d)] = time.time() + d
    assert amqp.get_all(qname) == []
    arrived = {}
    deadline = time.monotonic() + 15
    while len(arrived) < len(sent) and time.monotonic() < deadline:
        for props, _ in amqp.get_all(qname):
            arrived[props.message_id] = time.time()
        time.sleep(0.02)
    assert arrived.keys() == sent.keys()
    for mid, due in sent.items():
        assert arrived[mid] >= due - 0.05, "early"          # the poll's own clock slack
        assert arrived[mid] - due <= 1.5, f"late by {arrived[mid] - due:.2f}s"


def test_a_delay_past_one_pass_enters_the_top_level(client, amqp, qname):
    amqp.declare(qname)
    year = 365 * 86400
    client.submit(b"next year", queue=qname, delay=year)
    top = delays.level_name(delays.LEVELS - 1)
    got = wait_for(lambda: amqp.get_all(top), 5, what="the task in the top level")
    mine = [(p, b) for p, b in got if p.headers.get(delays.H_TO) == qname]
    assert len(mine) == 1
    props, body = mine[0]
    assert props.headers[delays.H_DUE_MS] / 1000 - time.time() > year - 60


def test_a_delayed_task_for_a_missing_queue_is_refused(client):
    with pytest.raises(SubmitError, match="no queue"):
        client.submit(b"x", queue=f"missing-{uuid.uuid4().hex}", delay=5)


def test_a_cancel_is_appended_to_the_vhost_cancel_log(client, amqp):
    from workqd import cancels
    mid = f"cancel-me-{uuid.uuid4().hex}"
    client.cancel(mid)
    # Read the stream from its start, as every daemon does, and find the entry.
    ch = amqp.channel()
    ch.basic_qos(prefetch_count=1000)
    seen = []

    def on_message(channel, method, props, body):
        seen.append(props.message_id)
        channel.basic_ack(method.delivery_tag)
    tag = ch.basic_consume(cancels.STREAM, on_message, arguments={"x-stream-offset": "first"})
    deadline = time.monotonic() + 10
    while mid not in seen and time.monotonic() < deadline:
        amqp.conn.process_data_events(time_limit=0.2)
    ch.basic_cancel(tag)
    assert mid in seen


def test_a_due_task_whose_queue_was_deleted_waits_in_the_unrouted_queue(client, amqp, qname):
    amqp.declare(qname)
    mid = client.submit(b"orphan", queue=qname, delay=1)
    amqp.delete(qname)

    ch = amqp.channel()

    def landed():
        # The queue is the vhost's, shared with the other test run: take only this
        # task, and put back what belongs to others.
        others, found = [], False
        while not found:
            method, props, _ = ch.basic_get(delays.UNROUTED)
            if method is None:
                break
            if props.message_id == mid:
                ch.basic_ack(method.delivery_tag)
                found = True
            else:
                others.append(method.delivery_tag)
        for tag in others:
            ch.basic_nack(tag, requeue=True)
        return found
    assert wait_for(landed, 15, what="the orphaned task in workq.delay.unrouted")
