"""Runs workqd's command line with a fork hook that records the master's thread count.

Used by test_master.py: every line of $WORKQ_FORK_LOG is "<pid> <threads>" for one
fork of the master (workers and the queue poller). On Python 3.12 and later a fork
with other threads alive also warns; the warning is made an error here.
"""

import os
import sys
import threading
import warnings

from workqd import cli

_log = os.environ["WORKQ_FORK_LOG"]
_master = os.getpid()


def _record() -> None:
    if os.getpid() == _master:   # forks of the workers themselves (command handlers) aside
        with open(_log, "a") as f:
            f.write(f"{os.getpid()} {threading.active_count()}\n")


warnings.simplefilter("error", DeprecationWarning)
os.register_at_fork(before=_record)
sys.exit(cli.main())
