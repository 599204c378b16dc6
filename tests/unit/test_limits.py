"""workqd/limits.py: rate parsing, the names on the broker, the generator's schedule and
the window arithmetic the integration tests and bench/limits.py judge limits by."""

from __future__ import annotations

import random

import pytest

from workqd import config, limits, state
from workqd.config import Limits
from workqd.slots import HOLDS_SLOT, LEADS_RATE, WAITS_SLOT, WAITS_TOKEN


@pytest.mark.parametrize("text, per_second, shown", [
    ("50/s", 50.0, "50/s"), ("300/min", 5.0, "300/min"), ("10/h", 10 / 3600, "10/h"),
    (" 2.5 / sec ", 2.5, "2.5/s"), ("1/minute", 1 / 60, "1/min"), ("7/HOUR", 7 / 3600, "7/h"),
])
def test_rates_in_every_unit(text, per_second, shown):
    got, normalised = limits.parse_rate(text)
    assert got == pytest.approx(per_second)
    assert normalised == shown


@pytest.mark.parametrize("bad", ["", "50", "50/d", "fast", "0/s", "-1/s", "1e3/s", "20001/s",
                                 "1/day", 50, None, True, "50/s/s"])
def test_rates_refused_with_the_forms_it_reads(bad):
    with pytest.raises(limits.RateError):
        limits.parse_rate(bad)


def test_names_share_a_bucket_only_for_the_same_setting():
    assert limits.cap_queue("jobs", 3) == "workq.cap.jobs.3"
    assert limits.token_queue("jobs", "50/s", 10) == "workq.rate.jobs.50-per-s.b10"
    assert limits.token_queue("jobs", "50/s", 10) != limits.token_queue("jobs", "50/s", 11)
    assert limits.token_queue("jobs", "50/s", 1) != limits.token_queue("jobs", "3000/min", 1)
    assert limits.generator_lock("jobs", "50/s", 10).startswith(limits.token_queue("jobs", "50/s",
                                                                                   10))


def test_token_queue_keeps_at_most_a_burst():
    args = limits.token_queue_arguments(7)
    assert args["x-max-length"] == 7 and args["x-overflow"] == "drop-head"
    assert args["x-queue-type"] == "quorum"


def test_probe_order_covers_every_slot_once_from_a_random_one():
    rng = random.Random(3)
    firsts = set()
    for _ in range(50):
        order = limits.probe_order(5, rng)
        assert sorted(order) == [1, 2, 3, 4, 5]
        # Consecutive, wrapping: the probes of one worker walk the ring.
        assert all(b == a % 5 + 1 for a, b in zip(order, order[1:]))
        firsts.add(order[0])
    assert firsts == {1, 2, 3, 4, 5}
    assert limits.probe_order(0) == []


def test_probe_pauses_are_jittered_within_bounds():
    rng = random.Random(1)
    pauses = [limits.probe_pause(rng) for _ in range(100)]
    assert all(limits.PROBE_MIN <= p <= limits.PROBE_MAX for p in pauses)
    assert len(set(pauses)) > 50


def test_the_generator_never_runs_ahead_of_the_rate():
    rate, burst, emitted = 20.0, 5, 0
    for step in range(1, 2001):   # 10 s in 5 ms turns
        elapsed = step * 0.005
        emitted += limits.tokens_due(elapsed, rate, emitted, burst)
        assert emitted <= elapsed * rate + 1e-9
    assert emitted == 200


def test_a_stalled_generator_catches_up_by_one_burst_at_most():
    assert limits.tokens_due(60.0, 20.0, 0, 5) == 5
    assert limits.tokens_due(0.04, 20.0, 0, 5) == 0
    assert limits.tokens_due(-1.0, 20.0, 0, 5) == 0


def test_tokens_published_only_where_the_burst_has_room():
    assert limits.tokens_to_publish(3, 0, 5) == 3
    assert limits.tokens_to_publish(3, 4, 5) == 1
    assert limits.tokens_to_publish(3, 5, 5) == 0
    assert limits.tokens_to_publish(3, 9, 5) == 0


def test_the_generator_waits_for_the_next_token_or_one_tick():
    assert limits.generator_wait(0.0, 20.0, 0) == pytest.approx(0.05)
    assert limits.generator_wait(0.0, 1000.0, 0) == limits.GENERATOR_TICK
    assert limits.generator_wait(0.0, 10 / 3600, 0) == pytest.approx(360.0)


def test_window_bound_is_the_burst_plus_what_the_window_and_the_jitter_generate():
    # 20/s, burst 1: the generator's 19.51/s over 10.25 s, and the token in stock.
    assert limits.window_bound(20.0, 1, 10.0) == 1 + 200
    # 50/s, burst 10, over 1 s: 48.8/s over 1.25 s is 60 (a short window gets the
    # jitter on top; the guarantee is for windows of 10 s and more).
    assert limits.window_bound(50.0, 10, 1.0) == 10 + 60


@pytest.mark.parametrize("rate", [0.5, 1.0, 7.0, 20.0, 50.0, 333.0, 10_000.0])
@pytest.mark.parametrize("window", [10.0, 11.0, 60.0, 3600.0])
def test_starts_in_a_guaranteed_window_stay_within_the_rate_despite_the_jitter(rate, window):
    # Only the burst may come on top of the rate; a token's late start never does.
    assert limits.window_bound(rate, 1, window) <= 1 + rate * window + 1e-9
    # And the margin costs a little throughput, not a lot.
    assert limits.generated_rate(rate) >= 0.97 * rate


def test_tokens_made_in_a_window_give_the_bound_with_starts_a_jitter_late():
    # Token k is made at k / generated rate and starts up to START_JITTER later; the
    # worst case for a window is a token made just before it that starts inside it.
    rate, window = 20.0, 10.0
    made = [k / limits.generated_rate(rate) for k in range(1, 2000)]
    starts = [t + (limits.START_JITTER if i % 7 == 0 else 0.0) for i, t in enumerate(made)]
    assert limits.max_in_window(starts, window) <= limits.window_bound(rate, 0, window) + 1
    assert limits.max_in_window(starts, window) <= rate * window


def test_max_and_min_in_a_sliding_window():
    times = [0.0, 0.25, 0.5, 5.0, 10.25, 10.5, 20.0]
    assert limits.max_in_window(times, 10.0) == 4    # 0.0 .. 5.0; 10.25 is out of 0.25's
    assert limits.max_in_window([1.0, 1.0, 1.0], 0.5) == 3
    assert limits.max_in_window([], 1.0) == 0
    evenly = [i * 50 for i in range(601)]   # 20/s for 30 s, in milliseconds
    assert limits.max_in_window(evenly, 10_000) == 200
    assert limits.min_in_window(evenly, 10_000) == 200
    assert limits.min_in_window([0.0, 1.0], 10.0) == 0


def test_max_concurrent_and_when_a_level_is_reached():
    spans = [(0, 1), (0.5, 1.5), (1, 2), (1.2, 3), (2.5, 3)]
    assert limits.max_concurrent(spans) == 3          # 1.2 .. 1.5
    assert limits.max_concurrent([(0, 1), (1, 2)]) == 1   # one ends as the next starts
    assert limits.first_reaching(spans, 3, 0.0) == 1.2
    assert limits.first_reaching(spans, 2, 2.0) == 2.5
    assert limits.first_reaching(spans, 4, 0.0) is None


def test_config_reads_limits():
    q = config.parse({"queues": [{"name": "jobs", "handler": {"python": "a:b"},
                                  "limits": {"concurrency": 3, "rate": "300/min",
                                             "burst": 4}}]}, "x.yaml").queues[0]
    assert q.limits == Limits(concurrency=3, rate=5.0, rate_text="300/min", burst=4)
    plain = config.parse({"queues": [{"name": "jobs", "handler": {"python": "a:b"}}]},
                         "x.yaml").queues[0]
    assert not plain.limits.any


@pytest.mark.parametrize("lim, says", [
    ({"concurrency": -1}, "queues[0].limits.concurrency: must be a whole number >= 0"),
    ({"concurrency": "ten"}, "queues[0].limits.concurrency: must be a whole number"),
    ({"rate": "fast"}, 'queues[0].limits.rate: must be a rate such as "50/s"'),
    ({"burst": 5}, "queues[0].limits.burst: applies to a rate; set rate too"),
    ({"rate": "5/s", "burst": 0}, "queues[0].limits.burst: must be a whole number >= 1"),
    ({"slots": 2}, "queues[0].limits.slots: unknown key"),
    ("3", "queues[0].limits: must be a mapping"),
])
def test_config_refuses_bad_limits_naming_the_key(lim, says):
    with pytest.raises(config.ConfigError) as e:
        config.parse({"queues": [{"name": "jobs", "handler": {"python": "a:b"},
                                  "limits": lim}]}, "x.yaml")
    assert says in str(e.value)


def test_config_refuses_a_name_the_limits_could_not_use():
    with pytest.raises(config.ConfigError) as e:
        config.parse({"queues": [{"name": "j" * 240, "handler": {"python": "a:b"},
                                  "limits": {"rate": "5/s"}}]}, "x.yaml")
    assert "longer than 255 bytes" in str(e.value)


def _queue_view(workers, limited=0, consuming=0) -> state.QueueView:
    return state.QueueView(name="jobs", size=len(workers), pool_state="running", counters={},
                           restarts={}, workers=tuple(workers), consuming=consuming,
                           depth=None, limits=Limits(concurrency=2), limited=limited)


def test_a_queue_held_back_by_its_cap_is_ready():
    waiting = [state.WorkerView(i, 100 + i, state.W_LIMITED, None, limit=WAITS_SLOT)
               for i in (1, 2)]
    snap = state.Snapshot(phase=state.READY, queues=(_queue_view(waiting, limited=2),),
                          broker_connected=True, loop_age=0.0, version="t")
    assert snap.readiness() == (True, "ready")
    nobody = state.Snapshot(phase=state.READY, queues=(_queue_view(waiting),),
                            broker_connected=True, loop_age=0.0, version="t")
    assert nobody.readiness()[0] is False


def test_the_view_counts_what_workers_hold_and_wait_for():
    ws = [state.WorkerView(1, 1, state.W_BUSY, "m", limit=HOLDS_SLOT | LEADS_RATE),
          state.WorkerView(2, 2, state.W_LIMITED, None, limit=WAITS_SLOT),
          state.WorkerView(3, 3, state.W_IDLE, None, limit=HOLDS_SLOT | WAITS_TOKEN)]
    q = _queue_view(ws, limited=1, consuming=2)
    assert (q.slots_held, q.waiting_slot, q.waiting_token, q.leads_rate) == (2, 1, 1, True)
