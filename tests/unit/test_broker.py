"""Broker failover order and backoff (workqd.broker.Failover), pure logic."""

from __future__ import annotations

from workqd.broker import Failover


def test_failover_spreads_rotates_and_backs_off():
    urls = ["amqp://a", "amqp://b", "amqp://c"]
    assert [Failover(urls, start=k).current for k in range(4)] == urls + urls[:1]
    f = Failover(urls)
    delays = [f.failed() for _ in range(6)]
    assert delays[:2] == [0.0, 0.0] and delays[2] > 0 and delays[3:] == sorted(delays[3:])
    assert f.current == "amqp://a"  # every node tried in turn
    f.succeeded()
    assert f.failed() == 0.0
    single = Failover(["amqp://a"])
    assert [single.failed() for _ in range(3)] == [0.25, 0.5, 1.0]
    assert max(single.failed() for _ in range(20)) == 15.0
