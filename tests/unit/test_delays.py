"""The delay levels' routing, walked without a broker: every delay visits exactly the
levels of its set bits, in order, and then reaches the delivery exchange."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from workqd import delays


def _matches(pattern: str, key: str) -> bool:
    """Topic matching for patterns made only of literal words and ``*``."""
    p, k = pattern.split("."), key.split(".")
    return len(p) == len(k) and all(a == "*" or a == b for a, b in zip(p, k))


def walk(seconds: int) -> tuple[list[int], int]:
    """The level queues a message published for ``seconds`` waits in, and its total wait."""
    exchanges, levels, binds = delays.topology()
    timed = [lv for lv in levels if lv.name != delays.UNROUTED]
    ttl = {lv.name: lv.arguments["x-message-ttl"] // 1000 for lv in timed}
    dead_letter_to = {lv.name: lv.arguments["x-dead-letter-exchange"] for lv in timed}
    key = delays.routing_key(seconds)
    exchange, visited, waited = delays.entry_exchange(seconds), [], 0
    for _ in range(2 * delays.LEVELS + 2):
        if exchange == delays.DELIVER_EXCHANGE:
            return visited, waited
        routes = [b for b in binds if b.source == exchange and _matches(b.routing_key, key)]
        assert len(routes) == 1, (exchange, key, routes)
        route = routes[0]
        if route.to_exchange:
            exchange = route.destination
        else:
            visited.append(int(route.destination.rsplit(".", 1)[1]))
            waited += ttl[route.destination]
            exchange = dead_letter_to[route.destination]
    raise AssertionError(f"no delivery for {seconds}s")


@given(st.integers(min_value=1, max_value=delays.MAX_PASS))
def test_every_delay_waits_exactly_its_bits(seconds):
    visited, waited = walk(seconds)
    assert waited == seconds
    assert visited == delays.levels_of(seconds)


@pytest.mark.parametrize("seconds, levels", [
    (1, [0]), (90, [6, 4, 3, 1]), (86400, [16, 14, 12, 8, 7]),
    (delays.MAX_PASS, list(reversed(range(delays.LEVELS))))])
def test_known_delays_route_through_their_levels(seconds, levels):
    assert walk(seconds)[0] == levels


def test_a_year_takes_more_than_one_pass():
    year = 365 * 86400
    assert delays.this_pass(delays.whole_seconds(year)) == delays.MAX_PASS
    assert delays.MAX_PASS < year


def test_every_level_ttl_is_one_the_broker_accepts():
    # RabbitMQ refuses an x-message-ttl above 2**32 - 1 ms.
    levels = delays.topology()[1]
    assert [lv.name for lv in levels[:delays.LEVELS]] == [delays.level_name(n)
                                                           for n in range(delays.LEVELS)]
    for level in levels[:delays.LEVELS]:
        assert 0 < level.arguments["x-message-ttl"] <= 2 ** 32 - 1


def test_a_due_task_whose_queue_is_gone_has_a_queue_to_go_to():
    exchanges, levels, binds = delays.topology()
    deliver = next(e for e in exchanges if e.name == delays.DELIVER_EXCHANGE)
    assert deliver.arguments == {"alternate-exchange": delays.UNROUTED}
    assert delays.UNROUTED in {e.name for e in exchanges} & {lv.name for lv in levels}
    assert any(b.source == b.destination == delays.UNROUTED for b in binds)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), 101 * 366 * 86400])
def test_bad_delays_are_refused(bad):
    with pytest.raises(ValueError):
        delays.whole_seconds(bad)


def test_fractions_round_up_so_nothing_is_early():
    assert delays.whole_seconds(0.2) == 1
    assert delays.whole_seconds(90.0) == 90


def test_entry_headers_leave_the_dead_letter_history_behind():
    h = delays.entry_headers({"x-death": [{"queue": delays.level_name(3)}], "kind": "a",
                              "x-first-death-queue": "q"}, "orders", 1234)
    assert h == {"kind": "a", delays.H_TO: "orders", delays.H_DUE_MS: 1234}
