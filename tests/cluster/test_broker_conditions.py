"""workqd against broker nodes with special settings: TLS, alarms, consumer_timeout.

Throwaway nodes from tests/brokers.py; the machine's own broker is not touched.
"""

from __future__ import annotations

import pika
import pytest

from conftest import queue_config, wait_for

pytestmark = pytest.mark.cluster
OUTCOME = "workqd_tasks_processed_total"


def _client(node):
    return pika.BlockingConnection(pika.URLParameters(node.url))


def _publish(node, queue, bodies, declare_type="classic"):
    conn = _client(node)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(queue, durable=True, arguments={"x-queue-type": declare_type})
    for body in bodies:
        ch.basic_publish("", queue, body.encode(), pika.BasicProperties(delivery_mode=2))
    conn.close()


def _tls_daemon(daemon, qname, node, **tls):
    return daemon([queue_config(qname, workers=2)], start=False,
                  broker={"url": node.url, "tls": tls})


# --- TLS ------------------------------------------------------------------------------

def test_tls_with_ca_verification(daemon, qname, tls_node, tls_certs):
    d = _tls_daemon(daemon, qname, tls_node, ca_file=tls_certs.path("ca.pem"))
    d.start()
    conn = pika.BlockingConnection(_tls_params(tls_node, tls_certs))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish("", qname, b"sleep=0", pika.BasicProperties(delivery_mode=2,
                                                                 message_id="over-tls"))
    conn.close()
    wait_for(lambda: "over-tls" in d.ledger.ended_ids(), 15, what="a task over TLS")
    assert d.stop() == 0


def test_mutual_tls_with_a_client_certificate(daemon, qname, mtls_node, tls_certs):
    d = _tls_daemon(daemon, qname, mtls_node, ca_file=tls_certs.path("ca.pem"),
                    cert_file=tls_certs.path("client.pem"), key_file=tls_certs.path("client.key"))
    d.start()
    assert d.http("/readyz")[0] == 200
    assert d.stop() == 0


@pytest.mark.parametrize("case", ["wrong CA", "expired", "no client certificate"])
def test_tls_failures_are_one_clear_line_and_a_stop(daemon, qname, case, tls_node, mtls_node,
                                                   expired_tls_node, tls_certs):
    node, ca, expect = {
        "wrong CA": (tls_node, "other-ca.pem", "certificate was refused"),
        "expired": (expired_tls_node, "ca.pem", "certificate has expired"),
        "no client certificate": (mtls_node, "ca.pem", "certificate required"),
    }[case]
    d = _tls_daemon(daemon, qname, node, ca_file=tls_certs.path(ca))
    d.start(wait_ready=False)
    assert d.proc.wait(30) == 1, d.log()
    log = d.log()
    lines = [line for line in log.splitlines() if "TLS with amqps://guest:***@localhost" in line]
    assert lines and all(expect in line for line in lines), log
    assert len(lines) <= 2 and "cannot stay up" in log, log   # one per worker: no loop
    assert "Traceback" not in log


def _tls_params(node, certs):
    import ssl
    params = pika.URLParameters(node.url)
    ctx = ssl.create_default_context(cafile=certs.path("ca.pem"))
    params.ssl_options = pika.SSLOptions(ctx, "localhost")
    return params


# --- alarms ---------------------------------------------------------------------------

def test_acks_go_on_through_an_alarm_and_retries_wait_for_it(daemon, qname, plain_node):
    _publish(plain_node, qname, ["n=bad fail=1"] + [f"n={i} sleep=0.1" for i in range(20)])
    d = daemon([queue_config(qname, workers=2, retry={"attempts": 2, "backoff": [1]})],
               start=False, broker={"url": plain_node.url})
    with plain_node.memory_alarm():
        # Not waiting for /readyz: it says 503 as soon as the failing task's copy is blocked.
        d.start(wait_ready=False)
        wait_for(lambda: d.http("/healthz")[0] == 200, 15, what="the master answers")
        wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="success") == 20, 30,
                 what="20 successes acked during the alarm")
        wait_for(lambda: d.metric("workqd_publishing_blocked", queue=qname) >= 1, 15,
                 what="the blocked worker counted")
        status, reason = d.http("/readyz")
        assert status == 503 and "blocks publishing" in reason, reason
        assert d.metric(OUTCOME, queue=qname, outcome="retry") == 0   # its copy waits
        assert "the broker blocks publishing" in d.log()
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 30,
             what="the retry, then the dead letter, after the alarm")
    assert d.metric(OUTCOME, queue=qname, outcome="retry") == 1
    wait_for(lambda: d.http("/readyz")[0] == 200, 15, what="ready after the alarm")
    assert d.metric("workqd_publishing_blocked", queue=qname) == 0
    assert "connection lost" not in d.log()
    assert d.stop() == 0


# --- consumer_timeout -------------------------------------------------------------------

def test_consumer_timeout_is_named_counted_and_ends_as_poison(daemon, qname, timeout_node):
    _publish(timeout_node, qname, ["n=slow sleep=20"])
    d = daemon([queue_config(qname, workers=1, timeout=60, max_redeliveries=2)], start=False,
               broker={"url": timeout_node.url})
    d.start()
    wait_for(lambda: d.metric("workqd_worker_restarts_total", queue=qname,
                              reason="consumer_timeout") >= 2, 90,
             what="two workers replaced after the broker's consumer_timeout")
    assert "stayed unacked past its consumer_timeout" in d.log()
    wait_for(lambda: d.metric(OUTCOME, queue=qname, outcome="dead_letter") == 1, 60,
             what="the task dead-lettered as poison on its next delivery")
    assert "poison" in d.log()
    assert d.stop() == 0
