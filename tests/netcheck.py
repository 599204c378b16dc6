"""Runs workqd's command line with a bug planted in the master's loop.

Used by test_master_robust.py: once the file named by $WORKQ_BUG_TRIGGER exists,
Master.manage_pools raises, as an unexpected bug in the loop would. The daemon
itself has no such hook; the patch lives here, in the test's own process image.
"""

import os
import sys

from workqd import cli
from workqd.master import Master

_trigger = os.environ["WORKQ_BUG_TRIGGER"]
_manage_pools = Master.manage_pools


def _manage_pools_with_a_bug(self, now):
    if os.path.exists(_trigger):
        raise RuntimeError("a bug planted by the test")
    return _manage_pools(self, now)


Master.manage_pools = _manage_pools_with_a_bug
sys.exit(cli.main())
