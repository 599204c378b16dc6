"""The exposition workqd writes from its cache is the one prometheus-client writes.

workqd.metrics keeps, per output format, the line prefixes prometheus-client
wrote for each series, and formats only the numbers at a scrape. These tests
render the same snapshots both ways (the cached path and the library's encoder
over the same metric families) for every format content negotiation can pick,
with the prometheus-client of the venv the tests run in.
"""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client.exposition import choose_encoder

from workqd import metrics, state
from workqd.config import Limits
from workqd.slots import COUNTER_WORDS, OUTCOME_WORDS, W_DURATION_SUM, W_REDELIVERED
from workqd.vocab import RESTART_REASONS

# What scrapers send: nothing, Prometheus 2 and 3, and the variants prometheus-client
# negotiates apart (versions, name escapings).
ACCEPTS = [
    None, "", "*/*", "text/plain", "text/plain;version=0.0.4",
    "application/openmetrics-text",
    "application/openmetrics-text; version=1.0.0; charset=utf-8",
    "application/openmetrics-text;version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;"
    "escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "text/plain;version=1.0.0;escaping=underscores", "text/plain;version=1.0.0;escaping=dots",
    "application/openmetrics-text;version=1.0.0;escaping=values",
    "application/openmetrics-text;version=2.0.0",
]


def queue(name: str, seed: int, limits=None, depth=(3, 2, 1), workers=2) -> state.QueueView:
    counters = {w: (seed * 7 + i) % 13 for i, w in enumerate(COUNTER_WORDS)}
    counters[W_DURATION_SUM] = seed * 0.125 + 1e-9
    counters[W_REDELIVERED] = seed
    counters[OUTCOME_WORDS[0]] = 10 ** (seed % 12)   # big numbers: Go's exponent form
    restarts = {r: i + seed for i, r in enumerate(RESTART_REASONS)}
    states = [state.W_BUSY, state.W_IDLE, state.W_DRAINING, state.W_PAUSED, state.W_LIMITED,
              state.W_STARTING]
    views = tuple(state.WorkerView(n, 1000 + n, states[(n + seed) % len(states)], None,
                                   limit=n % 16) for n in range(workers))
    return state.QueueView(name=name, size=workers, pool_state="running",
                           counters=state.frozen(counters), restarts=state.frozen(restarts),
                           workers=views, consuming=1, depth=depth, limits=limits,
                           min_workers=1, max_workers=workers + seed)


def snapshot(seed: int = 1, names=("tasks", "reports")) -> state.Snapshot:
    queues = [queue(n, seed + i) for i, n in enumerate(names)]
    queues.append(queue('odd "name"\\ with\nnewline ü', seed, depth=None,
                        limits=Limits(concurrency=3, rate=2.5, rate_text="5/2s", burst=2)))
    queues.append(queue("capped", seed + 5, limits=Limits(concurrency=1)))
    queues.append(queue("rated", seed + 6, limits=Limits(rate=1e-3, rate_text="1/1000s")))
    schedules = (state.ScheduleView("nightly", "reports", True, "h1", 1.7e9, 1.7e9 + 86400, 3),
                 state.ScheduleView("new", "tasks", False, "", None, None))
    return state.Snapshot(phase=state.READY, queues=tuple(queues), broker_connected=seed % 2 == 1,
                          loop_age=0.0, version="0.0-test", delayed=seed * 11,
                          schedules=schedules)


def by_library(snap: state.Snapshot, accept) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept)
    return encoder(metrics._Metrics(metrics.families(snap))), content_type


@pytest.mark.parametrize("accept", ACCEPTS)
def test_cached_lines_are_the_librarys(accept):
    exposition = metrics.Exposition()
    for seed in (1, 2, 3):   # the first scrape learns the lines, later ones reuse them
        snap = snapshot(seed)
        assert exposition.render(snap, accept) == by_library(snap, accept)
    assert all(fmt is not None for fmt in exposition._formats.values()), \
        "this format fell back to the library: its lines did not fit"
    # Series come and go (a reload renames queues, a poll adds depths).
    snap = dataclasses.replace(snapshot(4, names=("other",)), delayed=None, schedules=())
    assert exposition.render(snap, accept) == by_library(snap, accept)


def test_every_family_is_written_even_without_samples():
    snap = state.Snapshot(phase=state.STARTING, queues=(), broker_connected=False,
                          loop_age=0.0, version="v")
    text = metrics.Exposition().render(snap)[0].decode()
    for _, name, _, _ in metrics.FAMILIES:
        assert f"# TYPE {name}" in text
    assert "workqd_broker_connected 0.0\n" in text
    assert 'workqd_build_info{version="v"} 1.0\n' in text


def test_a_format_whose_lines_do_not_fit_is_rendered_by_the_library(monkeypatch):
    # An encoder that stamps each sample line: not "<text> <number>" at the end.
    def stamped(registry):
        lines = []
        for metric in registry.collect():
            lines.append(f"# TYPE {metric.name} {metric.type}\n")
            lines.extend(f"{s.name} {s.value} 123\n" for s in metric.samples)
        return "".join(lines).encode()
    monkeypatch.setattr(metrics, "choose_encoder", lambda accept: (stamped, "text/x-stamped"))
    exposition = metrics.Exposition()
    snap = snapshot()
    body, content_type = exposition.render(snap, "text/x-stamped")
    assert content_type == "text/x-stamped"
    assert body == stamped(metrics._Metrics(metrics.families(snap)))
    assert list(exposition._formats.values()) == [None]
    assert exposition.render(snap, "text/x-stamped")[0] == body


def test_series_prefixes_stay_bounded(monkeypatch):
    monkeypatch.setattr(metrics, "_MAX_SERIES", 50)
    exposition = metrics.Exposition()
    for i in range(20):   # queues renamed again and again
        snap = snapshot(i, names=(f"q{i}",))
        assert exposition.render(snap) == by_library(snap, None)
    (fmt,) = exposition._formats.values()
    assert len(fmt.series) <= 50


def test_each_family_carries_its_own_numbers():
    # Every figure distinct, so a family written with another's numbers shows.
    q = dataclasses.replace(queue("q", 1, depth=(5, 6, 7), limits=Limits(
        concurrency=12, rate=13.0, rate_text="13/s", burst=1)), size=4, min_workers=1,
        max_workers=9, blocked=2, paused=True)
    snap = state.Snapshot(phase=state.READY, queues=(q,), broker_connected=True, loop_age=0.0,
                          version="v", delayed=11,
                          schedules=(state.ScheduleView("s", "q", True, "h", 100.0, 200.0, 3),))
    lines = set(metrics.Exposition().render(snap)[0].decode().splitlines())
    c = q.counters
    expected = {
        'workqd_pool_size{queue="q"} 4.0', 'workqd_pool_min_workers{queue="q"} 1.0',
        'workqd_pool_max_workers{queue="q"} 9.0', 'workqd_publishing_blocked{queue="q"} 2.0',
        'workqd_queue_paused{queue="q"} 1.0', 'workqd_queue_messages_ready{queue="q"} 5.0',
        'workqd_queue_consumers{queue="q"} 6.0', 'workqd_dead_letter_messages{queue="q"} 7.0',
        'workqd_limit_concurrency{queue="q"} 12.0', 'workqd_limit_rate{queue="q"} 13.0',
        'workqd_delayed_messages 11.0', 'workqd_broker_connected 1.0',
        'workqd_schedule_last_fired_timestamp_seconds{schedule="s"} 100.0',
        'workqd_schedule_next_fire_timestamp_seconds{schedule="s"} 200.0',
        'workqd_schedule_fired_total{schedule="s"} 3.0', 'workqd_schedule_leader{schedule="s"} 1.0',
        f'workqd_tasks_redelivered_total{{queue="q"}} {float(c[W_REDELIVERED])}',
        f'workqd_task_duration_seconds_sum{{queue="q"}} {c[W_DURATION_SUM]!r}',
        f'workqd_worker_restarts_total{{queue="q",reason="{RESTART_REASONS[0]}"}} '
        f'{float(q.restarts[RESTART_REASONS[0]])}',
    }
    assert expected <= lines, sorted(expected - lines)
