"""The master's phases (workqd.state) and the master's moves between them."""

from __future__ import annotations

import pytest

from workqd import config, state

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
