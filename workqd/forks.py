"""Forking the master's children so that they keep sharing the master's memory.

A forked child shares every page of the master's heap until one of the two writes
to it. CPython's garbage collector writes into the header of every object it
examines, so the first full collection in a child would copy nearly every page
holding the master's objects (modules, code, config) into that child alone: each
worker would pay for its own copy of what they all hold alike. ``gc.freeze()``
moves every object alive at the fork out of the collector's reach, in the child
for good; the master takes them back at once (``gc.unfreeze()``), so its own
garbage, over a life of many forks, is still collected.
"""

from __future__ import annotations

import gc
import os


def fork() -> int:
    """``os.fork()`` with the master's objects frozen for the child; 0 in the child."""
    gc.freeze()
    try:
        pid = os.fork()
    except BaseException:
        gc.unfreeze()
        raise
    if pid:
        gc.unfreeze()
    return pid
