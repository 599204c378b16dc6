"""Forking the master's children so that they keep sharing the master's memory.

A forked child shares every page of the master's heap until one of the two writes
to it. CPython's garbage collector writes into the header of every object it
examines, so a full collection in either process copies nearly every page holding
the master's objects (modules, code, config) into that process alone.

Two freezes keep those pages shared. ``settle()``, once in the master before its
first fork, runs one last full collection and then moves every object alive (what
the imports and the configuration built, which lives as long as the master) out of
the collector's reach for good: the master's later collections walk only what it
allocates afterwards, so the master does not copy its own heap away from its
children either. ``fork()`` freezes, in the child and at once, whatever the master
held at the fork; that is a splice of the collector's lists, a few writes whatever
the heap's size. The master's later objects stay collectable in the master.
"""

from __future__ import annotations

import gc
import os


def settle() -> None:
    """Freeze, for the rest of the master's life, every object alive now. Call once,
    after the imports and the configuration and before the first fork."""
    gc.collect()
    gc.freeze()


def fork() -> int:
    """``os.fork()`` with every object the child inherits frozen in it; 0 in the child."""
    pid = os.fork()
    if pid == 0:
        gc.freeze()
    return pid
