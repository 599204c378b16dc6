"""The pool (workqd.pool): exit table and state machine, with fake processes."""

from __future__ import annotations

import os
import signal
import time

import pytest

from workqd import config, exitcodes, vocab
from workqd import pool as pool_mod
from workqd.pool import (BACKOFF, BOOT_FAILED, CRASHED, FATAL, GAVE_UP, MAX_BOOT_FAILURES,
                         RECYCLED, RETIRED, RUNNING, Pool, WorkerProc, classify)
from workqd.slots import Slot, SlotTable, Totals

CFG = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}, "timeout": 5,
                                "retry": {"attempts": 1}}]}, "t.yaml")
QUEUE = CFG.queues[0]


def _status_exit(code):
    return code << 8


def _status_signal(sig):
    return sig


@pytest.mark.parametrize("retiring, status, consumed, kind", [
    ("reload", _status_exit(0), True, RETIRED),
    ("shutdown", _status_signal(signal.SIGKILL), True, RETIRED),
    (None, _status_exit(exitcodes.WORKER_BOOT_ERROR), False, GAVE_UP),
    (None, _status_exit(exitcodes.WORKER_BROKER_REFUSED), True, GAVE_UP),
    (None, _status_exit(exitcodes.WORKER_BAD_SETTINGS), False, GAVE_UP),
    (None, _status_exit(exitcodes.WORKER_QUEUE_MISSING), False, GAVE_UP),
    (None, _status_exit(exitcodes.WORKER_CONSUMER_TIMEOUT), True, "consumer_timeout"),
    (None, _status_exit(exitcodes.WORKER_RECYCLE), True, RECYCLED),
    (None, _status_exit(exitcodes.WORKER_CANCELLED), True, "cancelled"),
    (None, _status_signal(signal.SIGKILL), True, CRASHED),
    (None, _status_signal(signal.SIGKILL), False, CRASHED),   # killed, not a broken start
    (None, _status_exit(exitcodes.WORKER_CRASH), True, CRASHED),
    (None, _status_exit(exitcodes.WORKER_CRASH), False, BOOT_FAILED),
])
def test_exit_classification(retiring, status, consumed, kind):
    proc = WorkerProc(1, 1, None, retiring=retiring)
    assert classify(proc, status, None, consumed).kind == kind


class FakePool(Pool):
    """Spawns slots instead of processes."""

    def spawn_worker(self, number, now=0.0):
        slot = self.slots.allocate(self.pool_id)
        pid = 100000 + len(self.spawned)
        self.spawned.append(pid)
        slot.set_pid(pid)
        proc = WorkerProc(pid, number, slot)
        self.procs[pid] = proc
        return proc


def _pool(workers=2):
    q = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"},
                                  "workers": workers}]}, "t.yaml").queues[0]
    pool = FakePool(queue=q, pool_id=1, restarts=dict.fromkeys(vocab.RESTART_REASONS, 0),
                    broker=CFG.broker, slots=SlotTable(capacity=64), totals=Totals(), wake_fd=-1,
                    log_level="info", child_init=lambda: None)
    pool.spawned = []
    return pool


def test_boot_failures_back_off_then_give_up():
    pool, now = _pool(workers=1), 0.0
    delays = []
    for i in range(MAX_BOOT_FAILURES):
        pool.spawn_workers(now)
        assert len(pool.procs) == 1
        pool.on_exit(next(iter(pool.procs.values())), _status_exit(exitcodes.WORKER_CRASH), now)
        if pool.state == FATAL:
            break
        assert pool.state == BACKOFF
        delays.append(pool.next_spawn - now)
        pool.spawn_workers(now)        # still backing off: nothing spawned
        assert not pool.procs
        now = pool.next_spawn
    assert pool.state == FATAL and i == MAX_BOOT_FAILURES - 1
    assert delays == sorted(delays) and delays[0] < delays[-1]


def test_killed_workers_that_never_consumed_are_not_a_crash_loop():
    pool, now = _pool(workers=1), 0.0
    for _ in range(3 * MAX_BOOT_FAILURES):
        pool.spawn_workers(now)
        pool.on_exit(next(iter(pool.procs.values())), _status_signal(signal.SIGKILL), now)
        now = max(now, pool.next_spawn) + 0.01
    assert pool.state == RUNNING and pool.restarts["crash"] == 3 * MAX_BOOT_FAILURES


def test_fatal_exit_stops_the_pool_at_once():
    pool = _pool()
    pool.spawn_workers(0)
    pool.on_exit(next(iter(pool.procs.values())), _status_exit(exitcodes.WORKER_QUEUE_MISMATCH), 0)
    assert pool.state == FATAL and "other arguments" in pool.fatal_reason
    pool.spawn_workers(0)
    assert len(pool.procs) == 1    # no respawn


def test_consuming_again_leaves_backoff():
    pool = _pool(workers=1)
    pool.spawn_workers(0)
    pool.on_exit(next(iter(pool.procs.values())), _status_exit(exitcodes.WORKER_CRASH), 0)
    assert pool.state == BACKOFF
    pool.spawn_workers(pool.next_spawn)
    next(iter(pool.procs.values())).slot.subscribed()
    pool.note_progress()
    assert pool.state == RUNNING and pool.boot_failures == 0


def test_crash_holding_a_message_is_recorded_for_poison_detection():
    pool = _pool()
    pool.spawn_workers(0)
    proc = next(iter(pool.procs.values()))
    proc.slot.subscribed()
    proc.slot.begin("poison-1", False, time.monotonic())
    pool.on_exit(proc, _status_signal(signal.SIGSEGV), 0)
    assert pool.slots.crashes(1, "poison-1", me=0) == 1
    assert pool.restarts["crash"] == 1 and pool.state == RUNNING


def test_reload_retires_old_workers_only_as_new_ones_consume():
    pool = _pool(workers=2)
    pool.spawn_workers(0)
    old = list(pool.procs.values())
    for p in old:
        p.slot.subscribed()
        pool.retire(p, "reload")
    signalled = []
    pool.kill = lambda pid, sig: signalled.append(pid)
    pool.spawn_workers(0)
    new = [p for p in pool.procs.values() if p not in old]
    assert len(new) == 2
    pool.retire_surplus()
    assert signalled == []                # no new worker consumes yet: keep the old ones
    new[0].slot.subscribed()
    pool.retire_surplus()
    assert signalled == [old[0].pid]      # one in, one out
    new[1].slot.subscribed()
    pool.retire_surplus()
    assert signalled == [old[0].pid, old[1].pid]


def test_a_batch_of_forked_workers_starts_only_once_the_whole_batch_is_forked(monkeypatch):
    # Real forks. Each child looks, as its run begins, at the slot table it shares with
    # the master: the master records a worker's pid there just after forking it, so a
    # child that began before the batch was complete would see some pids missing.
    table = SlotTable(capacity=64)

    class Child:
        def __init__(self, number, *args):
            pass

        def run(self):
            pids = [Slot(table, i).pid for i in range(table.capacity)]
            return 0 if sum(1 for p in pids if p) == 3 else 1

    monkeypatch.setattr(pool_mod, "Worker", Child)
    q = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"},
                                  "workers": 3}]}, "t.yaml").queues[0]
    pool = Pool(queue=q, pool_id=1, restarts=dict.fromkeys(vocab.RESTART_REASONS, 0),
                broker=CFG.broker, slots=table, totals=Totals(), wake_fd=-1,
                log_level="info", child_init=lambda: None)
    assert pool.spawn_workers(0.0) is None
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in list(pool.procs)]
    assert codes == [0, 0, 0]
    assert pool._gate is None   # the master kept no end of the gate open
