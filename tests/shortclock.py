"""Runs workqd's command line with some of the master's clocks shortened from the
environment: $WORKQ_HUNG_AFTER (the hang clock of a worker),
$WORKQ_POLLER_STUCK_AFTER (how long the queue poller may go without a report),
$WORKQ_CONSUMER_CHECK_EVERY and $WORKQ_CONSUMER_CHECK_UNANSWERED (a worker's check
of its consumer, and how long its answer may take), $WORKQ_SCHEDULES_STUCK_AFTER (how
long one turn of the schedules thread may take).

Used by test_master_robust.py to show, with real processes and in seconds, what the
master does when they run out (and that a handler's slow import is judged by
import_timeout, not by the hang clock).
"""

import os
import sys

from workqd import cli, pool, poller, schedules
from workqd.worker import process, session

if "WORKQ_HUNG_AFTER" in os.environ:
    pool.HUNG_AFTER = float(os.environ["WORKQ_HUNG_AFTER"])
if "WORKQ_POLLER_STUCK_AFTER" in os.environ:
    poller.STUCK_AFTER = float(os.environ["WORKQ_POLLER_STUCK_AFTER"])
if "WORKQ_CONSUMER_CHECK_EVERY" in os.environ:
    process.CONSUMER_CHECK_EVERY = float(os.environ["WORKQ_CONSUMER_CHECK_EVERY"])
if "WORKQ_CONSUMER_CHECK_UNANSWERED" in os.environ:
    session.CONSUMER_CHECK_UNANSWERED = float(os.environ["WORKQ_CONSUMER_CHECK_UNANSWERED"])
if "WORKQ_SCHEDULES_STUCK_AFTER" in os.environ:
    schedules.STUCK_AFTER = float(os.environ["WORKQ_SCHEDULES_STUCK_AFTER"])
sys.exit(cli.main())
