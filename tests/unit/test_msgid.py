"""Message ids that carry their publish time (workqd.msgid): made, read back, and
every other string read as no time at all."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from workqd.msgid import FUTURE_MS, PAST_MS, new_message_ids, stamp_ms

NOW = 1_796_000_000_000   # ms: 2026-11-30


def test_ids_are_distinct_version_7_uuids_stamped_with_the_time_given():
    ids = new_message_ids(5000, NOW)
    assert len(set(ids)) == 5000
    for mid in ids:
        u = uuid.UUID(mid)
        assert (u.hex, u.version, u.variant) == (mid, 7, uuid.RFC_4122)
        assert u.int >> 80 == NOW
        assert stamp_ms(mid, NOW) == NOW
    assert new_message_ids(0, NOW) == []


def test_the_random_part_is_not_the_same_bits_over_and_over():
    ids = new_message_ids(2000, NOW)
    # 74 random bits each: every hex digit of the tail but the variant takes many values.
    for k in (13, 14, 15, 17, 24, 31):
        assert len({mid[k] for mid in ids}) == 16, k
    assert {mid[16] for mid in ids} == set("89ab")


def test_another_producers_version_7_id_counts_in_either_spelling():
    mid = new_message_ids(1, NOW - 30_000)[0]
    dashed = str(uuid.UUID(mid))
    assert stamp_ms(dashed, NOW) == NOW - 30_000
    assert stamp_ms(dashed.upper(), NOW) == NOW - 30_000


def test_a_time_outside_the_plausible_window_says_nothing():
    assert stamp_ms(new_message_ids(1, NOW - PAST_MS - 1)[0], NOW) is None
    assert stamp_ms(new_message_ids(1, NOW + FUTURE_MS + 1)[0], NOW) is None
    assert stamp_ms(new_message_ids(1, NOW - PAST_MS)[0], NOW) == NOW - PAST_MS


def test_other_ids_say_nothing():
    for mid in (uuid.uuid4().hex, str(uuid.uuid4()), uuid.uuid1().hex, "m-1", "", None, 42,
                b"0" * 32, "sha1:" + "0" * 20,
                # version and variant right, but not hex, or signs int() would accept
                "0193f0a1b2c37" + "zzz" + "8" + "0" * 15,
                " 193f0a1b2c37" + "000" + "8" + "0" * 15,
                "0x93f0a1b2c37" + "000" + "8" + "0" * 15,
                "0193f0a1b2c37" + "000" + "c" + "0" * 15,          # variant bits 11
                "0193f0a1-b2c3-7000-8000-00000000000-"):           # dashes misplaced
        assert stamp_ms(mid, NOW) is None, mid


@given(st.one_of(st.text(max_size=40), st.binary(max_size=40), st.integers(), st.none(),
                 st.text(alphabet="0123456789abcdefABCDEF-7", min_size=32, max_size=36)))
def test_no_id_makes_the_reader_raise(mid):
    ms = stamp_ms(mid, NOW)
    assert ms is None or NOW - PAST_MS <= ms <= NOW + FUTURE_MS
