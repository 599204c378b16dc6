"""Runs workqd's command line with a worker slot table of $WORKQ_SLOTS slots.

Used by test_master_robust.py to run the table full with real processes (the
daemon's own table has 1,024 slots, too many to fill in a test).
"""

import functools
import os
import sys

from workqd import cli, master
from workqd.slots import SlotTable

master.SlotTable = functools.partial(SlotTable, capacity=int(os.environ["WORKQ_SLOTS"]))
sys.exit(cli.main())
