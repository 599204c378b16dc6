"""The master's phases (workqd.state) and the master's moves between them."""

from __future__ import annotations

import dataclasses
import os

import pytest

from workqd import commands, config, state
from workqd.master import Master
from workqd.slots import CONSUMING, OUTCOME_WORDS, SlotTable

from .test_master import FakeOS, FakePoller

CFG = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}, "timeout": 5,
                                "retry": {"attempts": 1}}]}, "t.yaml")


# Written out here rather than read from state.PHASES, so that a changed table
# fails this test instead of agreeing with itself.
EXPECTED = {state.STARTING: {state.READY, state.STOPPING},
            state.READY: {state.RELOADING, state.STOPPING},
            state.RELOADING: {state.READY, state.STOPPING},
            state.STOPPING: set()}
# How a new master reaches each phase along allowed moves.
ROUTE = {state.STARTING: [], state.READY: [state.READY],
         state.RELOADING: [state.READY, state.RELOADING], state.STOPPING: [state.STOPPING]}


def test_the_phase_table_is_the_one_documented():
    assert state.PHASES == EXPECTED


@pytest.mark.parametrize("phase", sorted(EXPECTED))
def test_master_phases_only_move_along_the_table(phase):
    from workqd.master import Master
    for target in EXPECTED:
        m = Master(CFG)
        for step in ROUTE[phase]:
            m.enter(step)
        assert m.phase == phase
        m.enter(phase)                     # staying in a phase is no move
        assert m.phase == phase
        if target == phase:
            continue
        if target in EXPECTED[phase]:
            m.enter(target)
            assert m.phase == target
        else:
            refused = m.refused_moves
            m.enter(target)                # not in the table: refused and logged, not raised
            assert m.phase == phase and m.refused_moves == refused + 1


class _RacingSlot:
    """A slot whose handler thread begins a recycling worker's last task the moment
    the reader looks at the busy word: busy goes up first, then draining."""

    def __init__(self):
        self._busy = self._draining = False
        self.state = state.CONSUMING
        self.busy_since, self.tasks_done, self.limit = 0.0, 2, 0

    @property
    def busy(self):
        seen = self._busy
        self._busy = self._draining = True   # the writer runs between the two reads
        return seen

    @property
    def draining(self):
        return self._draining

    def message_id(self):
        return "m" if self._busy else None


def test_a_worker_beginning_its_last_task_is_never_seen_draining_before_busy():
    proc = type("Proc", (), {"slot": _RacingSlot(), "number": 1, "pid": 10})()
    view = state.worker_view(proc, now=1.0)
    # Either the old picture (idle) or the new one (busy); never the impossible
    # mix of "not busy yet" and "draining already", which counts no capacity.
    assert view.state in (state.W_IDLE, state.W_BUSY)


def test_a_snapshot_without_counters_differs_only_in_them():
    # The master with fake processes (test_master's seams), two queues at work.
    cfg = config.parse({"queues": [{"name": n, "workers": 2, "handler": {"python": "m:f"}}
                                   for n in ("a", "b")]}, "t.yaml")
    fake = FakeOS()
    m = Master(cfg, slots=SlotTable(capacity=8), clock=fake.clock, waitpid=fake.waitpid,
               spawn=fake.spawn, kill=fake.kill, poller=FakePoller(fake),
               load_config=lambda path: cfg)
    try:
        for q in cfg.queues:
            m.add_pool(q)
        m.turn(fake.now, [])
        for slot in (s for s in fake.alive.values() if s is not None):
            slot.set_state(CONSUMING)
            slot.record(0, 0.3)
        full, bare = m.snapshot(), m.snapshot(counters=False)
        assert [q.counters[OUTCOME_WORDS[0]] for q in full.queues] == [2, 2]
        assert [dict(q.counters) for q in bare.queues] == [{}, {}]
        assert bare == dataclasses.replace(full, loop_age=bare.loop_age, queues=tuple(
            dataclasses.replace(q, counters=b.counters) for q, b in zip(full.queues, bare.queues)))
        # So the status answer, which shows no counters, is the same from either.
        assert commands.status(bare, None, 1, "s") == commands.status(full, None, 1, "s")
    finally:
        m.sel.close()
        sq = m.signals
        for fd in (sq.read_fd, sq._sig_w, sq.wake_r, sq.wake_w):
            os.close(fd)
