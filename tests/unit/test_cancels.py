"""The shared cancel table against a plain set and across a fork; the poller's reading of
log entries; a worker's wait for the log; a running command stopped by a cancel."""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import time

import pika
import pytest
from hypothesis import given, settings, strategies as st

from workqd import cancels, config, runner
from workqd.cancels import CancelTable
from workqd.poller import cancel_entry
from workqd.slots import SlotTable
from workqd.task import Task
from workqd.worker import Worker


def d(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8), max_size=300),
       st.lists(st.text(min_size=1, max_size=8), max_size=50))
def test_lookups_agree_with_a_set(added, probed):
    table = CancelTable(capacity=1024)
    for text in added:
        table.add(d(text), 1_000, now_ms=1_000)
    for text in added + probed:
        assert table.cancelled(d(text), now_ms=2_000) == (text in added)


def test_an_entry_past_the_retention_is_gone_and_its_room_reused():
    table = CancelTable(capacity=64, retention=10)
    table.add(d("old"), 1_000, now_ms=1_000)
    assert table.cancelled(d("old"), now_ms=5_000)
    assert not table.cancelled(d("old"), now_ms=12_000)
    for i in range(64):
        table.add(d(f"new{i}"), 12_000, now_ms=12_000)
    assert table.replaced == 0   # every old entry made room without giving a live one up


def test_a_full_neighbourhood_gives_up_its_oldest_entry_and_counts_it():
    table = CancelTable(capacity=32)
    for i in range(40):
        table.add(d(f"id{i}"), 1_000 + i, now_ms=2_000)
    assert table.replaced == 8
    assert table.cancelled(d("id39"), now_ms=2_000)


def test_a_second_cancel_of_one_id_is_not_a_new_entry():
    table = CancelTable(capacity=64)
    assert table.add(d("x"), 1_000, now_ms=1_000)
    assert not table.add(d("x"), 1_500, now_ms=1_500)


def test_a_forked_child_sees_what_the_parent_adds_after_the_fork():
    table = CancelTable(capacity=64)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait for the parent's word, then look
        os.close(w)
        os.read(r, 1)
        os._exit(0 if table.cancelled(d("late")) else 1)
    os.close(r)
    table.add(d("late"), 1_000_000_000_000_000)
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_a_table_counts_what_it_holds_within_the_retention():
    table = CancelTable(capacity=64, retention=10)
    table.add(d("old"), 1_000, now_ms=1_000)
    table.add(d("new"), 9_000, now_ms=9_000)
    assert table.count(now_ms=9_000) == 2
    assert table.count(now_ms=12_000) == 1
    assert table.cancelled_at(d("new"), now_ms=12_000) == 9_000
    assert table.cancelled_at(d("old"), now_ms=12_000) == 0
    assert table.cancelled_at(d("never"), now_ms=12_000) == 0


def test_loaded_is_seen_by_a_child_forked_before_it_was_set():
    table = CancelTable(capacity=64)
    assert not table.loaded
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0 if table.loaded else 1)
    os.close(r)
    table.set_loaded()
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0 and table.loaded


# --- the poller's reading of a log entry: someone else's bytes ---------------------

def test_a_log_entry_is_read_or_named_as_unusable():
    def entry(mid, stamp="absent"):
        headers = None if stamp == "absent" else {cancels.H_CANCELLED_MS: stamp}
        return cancel_entry(pika.BasicProperties(message_id=mid, headers=headers),
                            now_ms=10_000_000, retention_ms=1_000_000)
    assert entry("a", 9_000_000) == ("a", 9_000_000)
    assert entry("a", 8_000_000) is None                  # past the retention: dropped quietly
    for mid, stamp in ((None, 9_000_000), ("", 9_000_000), (b"a", 9_000_000),
                       ("a", "absent"), ("a", "9000000"), ("a", True), ("a", 0), ("a", -1),
                       ("a", 9.5e6), ("a", 10_000_000 + 86_400_001), ("a", [1])):
        assert isinstance(entry(mid, stamp), str), (mid, stamp)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.text(), st.binary(), st.integers()),
       st.one_of(st.none(), st.integers(), st.floats(), st.text(), st.booleans(),
                 st.lists(st.integers())))
def test_no_log_entry_makes_the_reading_raise(mid, stamp):
    got = cancel_entry(pika.BasicProperties(message_id=mid,
                                            headers={cancels.H_CANCELLED_MS: stamp}),
                       now_ms=10_000_000)
    assert got is None or isinstance(got, str) or (got[0] == mid and got[1] == stamp)


# --- a worker waits for the log before its first connection -----------------------

def _worker(table):
    cfg = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"}}]}, "t.yaml")
    slot = SlotTable(capacity=4).allocate(1)
    return Worker(1, cfg.queues[0], cfg.broker, slot, -1, "info", table)


def test_a_worker_waits_for_the_log_until_it_is_read_or_its_wait_is_over(caplog):
    table = CancelTable(capacity=64)
    w = _worker(table)
    w._cancels_deadline = time.monotonic() + 60
    assert w._awaiting_cancels()
    table.set_loaded()
    assert w._awaiting_cancels()        # the poller has not tried the delay levels yet
    table.set_levels(cancels.LEVELS_DECLARED)
    assert not w._awaiting_cancels() and not w._declares_levels()
    table.set_levels(cancels.LEVELS_REFUSED)
    assert not w._awaiting_cancels() and w._declares_levels()
    late = _worker(CancelTable(capacity=64))
    late._cancels_deadline = time.monotonic() - 1
    assert not late._awaiting_cancels() and not late._awaiting_cancels()
    assert caplog.text.count("the cancel log is not read after") == 1
    assert not _worker(None)._awaiting_cancels() and _worker(None)._declares_levels()
    # A queue that declares no side queues does not wait for the levels.
    cfg = config.parse({"queues": [{"name": "q", "handler": {"python": "m:f"},
                                    "declare_side_queues": False, "type": "classic"}]},
                       "t.yaml")
    loaded = CancelTable(capacity=64)
    loaded.set_loaded()
    bare = Worker(1, cfg.queues[0], cfg.broker, SlotTable(capacity=4).allocate(1), -1, "info",
                  loaded)
    bare._cancels_deadline = time.monotonic() + 60
    assert not bare._awaiting_cancels()


# --- a running command is stopped on the I/O thread's word -------------------------

def _command(tmp_path, grace: float):
    termed = tmp_path / "termed"
    script = tmp_path / "long.sh"
    script.write_text(f"#!/bin/sh\ntrap 'echo term > {termed}; exit 143' TERM\n"
                      f"while :; do sleep 0.05; done\n")
    script.chmod(0o755)
    cfg = config.parse({"queues": [{"name": "q", "handler": {"command": [str(script)]}}]},
                       "t.yaml")
    return runner.load(cfg.queues[0].handler, timeout=60, grace=grace), termed


def _task(mid: str):
    t = Task(message_id=mid, queue="q", redelivered=False, delivery_count=0)
    t.deadline = time.monotonic() + 60
    return t


def test_a_cancelled_command_gets_term_and_its_run_raises_cancelled(tmp_path):
    run, termed = _command(tmp_path, grace=5)
    task = _task("m1")
    threading.Timer(0.3, run.cancel, args=(task,)).start()
    began = time.monotonic()
    with pytest.raises(runner.HandlerCancelled, match="stopped on SIGTERM within its grace"):
        run(b"", task)
    assert time.monotonic() - began < 3 and termed.read_text() == "term\n"


def test_a_stop_asked_for_another_task_leaves_this_one_running(tmp_path):
    run, termed = _command(tmp_path, grace=5)
    old, task = _task("old"), _task("new")
    run.cancel(old)       # asked for a task that has ended meanwhile
    began = time.monotonic()
    threading.Timer(0.5, run.cancel, args=(task,)).start()
    with pytest.raises(runner.HandlerCancelled):
        run(b"body", task)
    assert time.monotonic() - began >= 0.45   # ran until its own stop, not the stale one


def _resident_kib(table: CancelTable) -> int:
    """Resident KiB of the table's mapping, from /proc/self/smaps."""
    start = ctypes.addressof(ctypes.c_char.from_buffer(table._mm))
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= start < hi
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("the table's mapping is not in /proc/self/smaps")


def test_counting_an_empty_table_gives_its_pages_no_memory():
    # Reading a page of a shared mapping gives it memory, written or not: the poller
    # counts once per report, on hosts that mostly never cancel anything.
    table = CancelTable()
    assert table.count() == 0
    assert _resident_kib(table) <= 8
    table.add(d("one"), int(time.time() * 1000))
    assert table.count() == 1
