"""Runs workqd's command line with the master's hang clock set from $WORKQ_HUNG_AFTER.

Used by test_master_robust.py to show, with real processes and in seconds, that
a handler's slow import is judged by import_timeout and not by the hang clock.
"""

import os
import sys

from workqd import cli, pool

pool.HUNG_AFTER = float(os.environ["WORKQ_HUNG_AFTER"])
sys.exit(cli.main())
