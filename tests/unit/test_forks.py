"""The master's startup objects stay out of both collectors; what it makes later does not."""

from __future__ import annotations

import gc
import os
import weakref

import pytest

from workqd import forks


class Node:
    pass


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_settle_keeps_what_is_alive_frozen_in_the_master(unfrozen):
    keep = [[i] for i in range(1000)]   # tracked objects alive at settle
    forks.settle()
    frozen = gc.get_freeze_count()
    assert frozen >= len(keep)
    # Garbage made afterwards is still collected: a cycle, dropped.
    cycle = Node()
    cycle.me = cycle
    gone = weakref.ref(cycle)
    del cycle
    gc.collect()
    assert gone() is None
    assert gc.get_freeze_count() == frozen


def test_the_child_freezes_everything_it_inherits_and_the_master_nothing_more(unfrozen):
    forks.settle()
    frozen = gc.get_freeze_count()
    later = [[i] for i in range(1000)]   # made after settle, alive at the fork
    r, w = os.pipe()
    pid = forks.fork()
    if pid == 0:
        os.write(w, b"y" if gc.get_freeze_count() >= frozen + len(later) else b"n")
        os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 1)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert got == b"y" and os.WEXITSTATUS(status) == 0
    assert gc.get_freeze_count() == frozen


def test_a_failed_fork_freezes_nothing(monkeypatch, unfrozen):
    def no_fork():
        raise OSError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(OSError):
        forks.fork()
    assert gc.get_freeze_count() == 0
