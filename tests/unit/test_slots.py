"""The shared-memory slots (workqd.slots), with no broker and no processes: slot ownership
across the worker's two threads, and the crash table and the held message id: poison counting by a digest of the
whole id, so ids of any length and encoding count apart, and what a slot shows of an id
(a prefix, for logs and status) plays no part in the count."""

from __future__ import annotations

import os
import time

import pytest

from workqd import slots
from workqd.slots import (CONNECTING, CRASH_ENTRIES, MSGID_BYTES, SlotTable, message_digest,
                          stat_says_dying)

POOL = 1


def _holding(table: SlotTable, message_id: str, pid: int):
    """A slot as a worker leaves it when it dies running ``message_id``."""
    slot = table.allocate(POOL)
    slot.set_pid(pid)
    slot.begin(message_id, False, time.monotonic())
    return slot


def _die(table: SlotTable, message_id: str, pid: int) -> int:
    """What the master does when it reaps ``pid``: record the crash from the slot, free it."""
    slot = _holding(table, message_id, pid)
    count = table.record_crash(POOL, slot.message_digest(), pid)
    slot.release()
    return count


def _cut_at(byte: int) -> str:
    """An id longer than the shown prefix whose two-byte character starts at ``byte``."""
    return "p" * byte + "é" + "ü" * 60 + "end"


@pytest.mark.parametrize("byte", [MSGID_BYTES - 2, MSGID_BYTES - 1, MSGID_BYTES])
def test_a_long_id_with_a_character_across_the_cut_counts_every_death(byte):
    table, mid = SlotTable(8), _cut_at(byte)
    assert len(mid.encode()) > MSGID_BYTES
    assert [_die(table, mid, 1000 + n) for n in range(3)] == [1, 2, 3]
    assert table.crashes(POOL, mid, me=0) == 3


def test_ids_sharing_a_long_prefix_never_share_a_count():
    table = SlotTable(8)
    a, b = "x" * 200 + "-a", "x" * 200 + "-b"
    _die(table, a, 1001)
    _die(table, a, 1002)
    _die(table, b, 1003)
    assert (table.crashes(POOL, a, me=0), table.crashes(POOL, b, me=0)) == (2, 1)
    assert table.crashes(POOL, "x" * 200, me=0) == 0


def test_the_empty_id_and_ids_strict_utf8_cannot_encode_count():
    table = SlotTable(8)
    for mid in ("", "\udcc3\udca9", "é", "\ud800"):
        _die(table, mid, 1001)
        _die(table, mid, 1002)
    # Lone surrogates encode apart from the character whose bytes they spell.
    assert message_digest("\udcc3\udca9") != message_digest("é")
    assert [table.crashes(POOL, m, me=0) for m in ("", "\udcc3\udca9", "é", "\ud800")] == \
        [2, 2, 2, 2]


def test_counts_are_per_pool():
    table = SlotTable(8)
    _die(table, "m", 1001)
    assert table.crashes(POOL, "m", me=0) == 1 and table.crashes(POOL + 1, "m", me=0) == 0


def test_a_death_not_recorded_yet_counts_once():
    """A sibling takes the redelivery before the master has reaped the dead holder."""
    table, mid = SlotTable(8), _cut_at(MSGID_BYTES - 1)
    _die(table, mid, 1001)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)   # gone: its slot still says busy with the message
    slot = _holding(table, mid, pid)
    assert table.crashes(POOL, mid, me=0) == 2
    table.record_crash(POOL, slot.message_digest(), pid)
    assert table.crashes(POOL, mid, me=0) == 2   # recorded now: still one death, not two
    slot.release()
    assert table.crashes(POOL, mid, me=0) == 2


def test_a_holder_whose_exit_has_begun_counts_as_dead():
    """Its socket can close, and the broker redeliver, before it is a zombie: the exit
    flag (PF_EXITING, 0x4) in /proc/PID/stat is what a sibling sees then."""
    def stat(state: str, flags: int, comm: str = "workqd: worker (x) 1") -> bytes:
        return f"4242 ({comm}) {state} 1 4242 4242 0 -1 {flags} 0 0".encode()
    assert not stat_says_dying(stat("S", 0x400040))
    assert stat_says_dying(stat("R", 0x400044))
    assert stat_says_dying(stat("D", 0x4, comm="a ) b"))
    assert stat_says_dying(stat("Z", 0x400040))
    assert stat_says_dying(b"4242 (truncated")
    with open("/proc/self/stat", "rb") as f:
        assert not stat_says_dying(f.read())


def test_the_oldest_entry_makes_room_and_no_count_carries_over():
    table = SlotTable(2)
    for n in range(CRASH_ENTRIES):
        table.record_crash(POOL, message_digest(f"m{n}"), 1)
    table.record_crash(POOL, message_digest("m0"), 1)   # the oldest, recorded again: now newest
    table.record_crash(POOL, message_digest("new"), 1)
    assert table.crashes(POOL, "new", me=0) == 1
    assert table.crashes(POOL, "m0", me=0) == 2
    assert table.crashes(POOL, "m1", me=0) == 0   # aged out


@pytest.mark.parametrize("mid, shown", [
    ("short-id", "short-id"),
    ("", None),
    ("p" * (MSGID_BYTES - 1) + "é" + "tail", "p" * (MSGID_BYTES - 1) + "…"),
    ("p" * (MSGID_BYTES - 2) + "é" + "tail", "p" * (MSGID_BYTES - 2) + "é…"),
    ("€" * 100, "€" * (MSGID_BYTES // 3) + "…"),
    ("\ud800x", "\ufffd\ufffd\ufffdx"),
])
def test_a_slot_shows_a_prefix_cut_on_a_character(mid, shown):
    slot = SlotTable(2).allocate(POOL)
    assert slot.message_id() is None and slot.message_digest() is None   # idle
    slot.begin(mid, False, time.monotonic())
    assert slot.message_id() == shown
    assert slot.message_digest() == message_digest(mid)
    slot.end()
    assert slot.message_id() is None and slot.message_digest() is None


def test_a_shorter_id_after_a_longer_one_shows_only_itself():
    slot = SlotTable(2).allocate(POOL)
    slot.begin("€" * 100, False, time.monotonic())
    slot.end()
    slot.begin("b", False, time.monotonic())
    assert slot.message_id() == "b" and slot.message_digest() == message_digest("b")


def test_task_finishing_during_a_reconnect_does_not_make_the_worker_consuming():
    slot = SlotTable(capacity=1).allocate(1)
    slot.subscribed()
    slot.begin("m1", False, time.monotonic())   # handler thread
    slot.set_state(CONNECTING)             # I/O thread: connection lost
    assert not slot.consuming and slot.message_id() == "m1"   # still truthfully held
    slot.end()                             # handler thread finishes meanwhile
    assert not slot.consuming and slot.message_id() is None
    slot.subscribed()
    assert slot.consuming


def test_counters_read_every_counter_word_as_written():
    # Each word its own value (floats where the layout keeps floats), so a run read
    # from the wrong place or as the wrong type shows.
    slot = SlotTable(capacity=2).allocate(1)
    expected = {}
    for i, w in enumerate(slots.COUNTER_WORDS):
        if w in slots.FLOAT_WORDS:
            slot._d[slot._base + w] = expected[w] = i + 0.5
        else:
            slot._q[slot._base + w] = expected[w] = 1000 + i
    assert slot.counters() == expected
    assert slot.tasks_done == sum(expected[w] for w in slots.OUTCOME_WORDS)
