"""The broker going away and coming back while tasks flow."""

from __future__ import annotations

import contextlib
import subprocess
import time

import pytest

from conftest import Amqp, queue_config, wait_for


def rabbitmqctl(*args: str, timeout: float = 120) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=timeout)


@contextlib.contextmanager
def broker_app_stopped():
    """Stop the RabbitMQ application; whatever happens, start it again."""
    rabbitmqctl("stop_app")
    try:
        yield
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")


@pytest.mark.broker_outage
@pytest.mark.parametrize("outage", [0, 20], ids=["restart", "down-20s"])
def test_workers_reconnect_after_broker_outage(daemon, qname, outage):
    amqp = Amqp()
    d = daemon([queue_config(qname, workers=2, type="quorum")])
    ids = [amqp.publish(qname, f"n={i} sleep=0.1") for i in range(30)]
    wait_for(lambda: len(d.ledger.ended_ids()) >= 5, 20, what="tasks flowing")
    amqp.close()
    with broker_app_stopped():
        wait_for(lambda: d.http("/readyz")[0] == 503, 20, what="/readyz 503 while broker down")
        outage_end = time.monotonic() + outage
        while time.monotonic() < outage_end:  # not ready, and still running, throughout
            assert d.http("/readyz")[0] == 503
            assert d.proc.poll() is None
            time.sleep(0.5)
    # Workers come back by themselves: no daemon restart.
    d.wait_ready(timeout=60)
    amqp = Amqp()
    late = [amqp.publish(qname, f"late={i}") for i in range(5)]
    wait_for(lambda: d.ledger.ended_ids() >= set(ids) | set(late), 60,
             what="every task done after the restart")
    assert d.proc.poll() is None
    assert "reconnecting" in d.log()
    assert d.stop() == 0
    assert amqp.count(qname) == 0
    amqp.close()


def test_broker_urls_fail_over_to_the_next_node(daemon, qname):
    from conftest import BROKER_URL, free_port
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    d = daemon([queue_config(qname, workers=2)], start=False)
    d.config["broker"] = {"urls": [dead, BROKER_URL]}
    d.write_config()
    d.start()  # ready: every worker found the live node
    amqp = Amqp()
    mid = amqp.publish(qname, "sleep=0")
    wait_for(lambda: mid in d.ledger.ended_ids(), 10, what="task done via the second URL")
    assert "cannot connect to amqp://guest:***@127.0.0.1" in d.log()
    amqp.close()
