"""The shared cancel table against a plain set, and across a fork."""

from __future__ import annotations

import hashlib
import os

from hypothesis import given, settings, strategies as st

from workqd.cancels import CancelTable


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
