"""A forked child keeps the master's objects out of its collector; the master does not."""

from __future__ import annotations

import gc
import os

import pytest

from workqd import forks


def test_the_child_has_the_masters_objects_frozen_and_the_master_collects_them_still():
    keep = [object() for _ in range(100)]   # some objects alive at the fork
    r, w = os.pipe()
    pid = forks.fork()
    if pid == 0:
        os.write(w, b"y" if gc.get_freeze_count() >= len(keep) else b"n")
        os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 1)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert got == b"y" and os.WEXITSTATUS(status) == 0
    assert gc.get_freeze_count() == 0


def test_a_failed_fork_leaves_nothing_frozen(monkeypatch):
    def no_fork():
        raise OSError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(OSError):
        forks.fork()
    assert gc.get_freeze_count() == 0
