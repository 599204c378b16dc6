"""Slot logic of schedules: every, cron in a zone, what a leader fires after a gap."""

import datetime as dt

import pytest

from workqd import schedules
from workqd.schedules import GRACE, Slots, plan, slot_id


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_slot_id_is_name_at_utc_iso():
    assert slot_id("nightly-report", ts("2026-03-29T01:00:00Z")) == \
        "nightly-report@2026-03-29T01:00:00Z"


def test_iso_round_trip():
    t = ts("2026-10-25T00:30:00Z")
    assert schedules.from_iso(schedules.iso(t)) == t
    assert schedules.from_iso("2026-10-25T00:30:00+02:00") is None
    assert schedules.from_iso(None) is None


@pytest.mark.parametrize("every,after,expected", [
    (2, "2026-01-01T00:00:00Z", "2026-01-01T00:00:02Z"),
    (2, "2026-01-01T00:00:01.5Z", "2026-01-01T00:00:02Z"),
    (900, "2026-01-01T00:07:00Z", "2026-01-01T00:15:00Z"),
    (86400, "2026-03-29T01:00:00Z", "2026-03-30T00:00:00Z"),
])
def test_every_counts_from_the_epoch(every, after, expected):
    assert Slots(every=every).next_after(ts(after)) == ts(expected)


def test_cron_in_zone():
    s = Slots("30 2 * * *", timezone="Europe/Berlin")
    assert s.next_after(ts("2026-03-28T12:00:00Z")) == ts("2026-03-29T01:00:00Z")


def test_exactly_one_of_cron_and_every():
    with pytest.raises(ValueError):
        Slots()
    with pytest.raises(ValueError):
        Slots("* * * * *", every=5)


def test_newest_before():
    s = Slots(every=10)
    t = ts("2026-01-01T00:00:15Z")
    assert s.newest_before(t, t - 100) == ts("2026-01-01T00:00:10Z")
    assert s.newest_before(ts("2026-01-01T00:00:10Z"), t - 100) == ts("2026-01-01T00:00:00Z")
    assert s.newest_before(t, t - 3) is None
    yearly = Slots("0 0 1 1 *", timezone="Europe/Berlin")
    assert yearly.newest_before(ts("2026-06-01T00:00:00Z"), ts("2020-01-01T00:00:00Z")) \
        == ts("2025-12-31T23:00:00Z")


def test_plan_after_a_year_down_is_quick():
    """A minutely cron down for a year: one step finds the newest missed slot."""
    s = Slots("* * * * *", timezone="America/New_York")
    now = ts("2027-01-01T00:00:30Z")
    fire, handled = plan(s, ts("2026-01-01T00:00:00Z"), now, "last")
    assert fire == [ts("2027-01-01T00:00:00Z")]
    assert handled == ts("2027-01-01T00:00:00Z")


def test_plan_fires_each_due_slot_in_order():
    s = Slots(every=2)
    now = ts("2026-01-01T00:00:07Z")
    fire, handled = plan(s, ts("2026-01-01T00:00:02Z"), now, "none")
    assert fire == [ts("2026-01-01T00:00:04Z"), ts("2026-01-01T00:00:06Z")]
    assert handled == ts("2026-01-01T00:00:06Z")


def test_plan_nothing_due():
    s = Slots(every=60)
    fire, handled = plan(s, ts("2026-01-01T00:01:00Z"), ts("2026-01-01T00:01:59Z"), "last")
    assert fire == [] and handled == ts("2026-01-01T00:01:00Z")


@pytest.mark.parametrize("catch_up,expected", [
    ("none", []),
    ("last", ["2026-01-03T03:00:00Z"]),
])
def test_plan_after_downtime(catch_up, expected):
    """Two nightly slots missed by more than GRACE: none skips, last fires the newest."""
    s = Slots("0 3 * * *")
    fire, handled = plan(s, ts("2026-01-01T03:00:00Z"), ts("2026-01-03T09:00:00Z"), catch_up)
    assert fire == [ts(e) for e in expected]
    assert handled == ts("2026-01-03T03:00:00Z")


def test_plan_late_within_grace_fires_whatever_catch_up():
    """A failover shorter than GRACE loses no slot, even with catch_up none."""
    s = Slots("0 3 * * *")
    now = ts("2026-01-02T03:00:00Z") + GRACE - 1
    assert plan(s, ts("2026-01-01T03:00:00Z"), now, "none")[0] == [ts("2026-01-02T03:00:00Z")]


def test_plan_catch_up_last_superseded_by_an_on_time_slot():
    s = Slots(every=30)
    start = ts("2026-01-01T00:00:00Z")
    fire, handled = plan(s, start, start + 600, "last")
    assert fire == [start + 540, start + 570, start + 600]
    assert handled == start + 600


def test_plan_skips_missed_then_fires_on_time_ones():
    s = Slots(every=1)
    start = ts("2026-01-01T00:00:00Z")
    fire, handled = plan(s, start - 10, start + 10_000, "none")
    assert fire == [start + 10_000 - GRACE + k for k in range(int(GRACE) + 1)]
    assert handled == start + 10_000


@pytest.mark.parametrize("body,expected", [
    (b'{"slot": "2026-01-01T03:00:00Z", "fired": null, "leader": "a (pid 1)"}',
     (ts("2026-01-01T03:00:00Z"), None, "a (pid 1)")),
    (b'{"slot": "2026-01-01T03:00:00Z", "fired": "2026-01-01T03:00:00Z", "leader": "b"}',
     (ts("2026-01-01T03:00:00Z"), ts("2026-01-01T03:00:00Z"), "b")),
    (b"not json", None),
    (b'{"slot": 5, "leader": "a"}', None),
    (b'{"fired": null}', None),
    (b'[1, 2]', None),
    (b'{"slot": "2026-01-01T03:00:00Z", "leader": 7}', None),
])
def test_record_of(body, expected):
    assert schedules._record_of(body) == expected


def test_views_of_a_report_add_earlier_pollers_firings():
    raw = {"s": {"leading": True, "leader": "h (pid 5)", "fired": 3, "queue": "q",
                 "last_fired": 1.7e9, "next": 1.7e9 + 2}}
    (v,) = schedules.views(raw, {"s": 10})
    assert (v.name, v.queue, v.leading, v.leader, v.fired) == ("s", "q", True, "h (pid 5)", 13)
    assert (v.last_fired, v.next) == (1.7e9, 1.7e9 + 2)


@pytest.mark.parametrize("raw", [None, [], "x", {"s": 5}])
def test_views_of_a_bad_report_are_empty(raw):
    assert schedules.views(raw, {}) == ()


def test_views_read_a_bad_field_as_unknown():
    (v,) = schedules.views({"s": {"leading": 1, "fired": -4, "last_fired": "soon",
                                  "next": True}}, {})
    assert (v.leading, v.fired, v.last_fired, v.next, v.leader) == (False, 0, None, None, "")


def _run_leaders(slots: Slots, start: float, end: float, step: float, failovers: dict,
                 catch_up: str = "last"):
    """Leaders taking turns on a fake clock, as the hosts of a cluster do: each step the
    leader plans from the broker's record, fires (fire, then record), and at the times in
    ``failovers`` it dies. ``failovers[t] = True`` kills it between a confirmed firing
    and its record write (the one way to a duplicate); False kills it between steps. A
    new leader takes over a few seconds later, from whatever the record says.
    Returns (every firing in order, the slots whose record a dying leader cut)."""
    record = float(int(start))
    fired: list[float] = []
    cut: list[float] = []
    down_until = None
    pending = sorted(failovers.items())
    now = start
    while now <= end:
        if down_until is not None and now < down_until:
            now += step
            continue
        down_until = None
        fire, handled = plan(slots, record, now, catch_up)
        died = False
        for f in fire:
            fired.append(f)
            if pending and pending[0][0] <= now and pending[0][1]:
                pending.pop(0)          # confirmed, then dead before the record
                cut.append(f)
                died = True
                break
            record = f
        else:
            record = handled
            if pending and pending[0][0] <= now and not pending[0][1]:
                pending.pop(0)          # dead between two steps
                died = True
        if died:
            down_until = now + schedules.CLAIM_EVERY + 1
        now += step
    return fired, cut


@pytest.mark.parametrize("cron_text, start, end, must_fire", [
    # Spring forward in Berlin (29 March 2026): 02:30 falls in the gap, fires at 03:00 CEST.
    ("30 2 * * *", "2026-03-27T12:00:00Z", "2026-03-31T12:00:00Z",
     ["2026-03-28T01:30:00Z", "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]),
    # Fall back (25 October 2026): 02:30 happens twice, fires once.
    ("30 2 * * *", "2026-10-23T12:00:00Z", "2026-10-27T12:00:00Z",
     ["2026-10-24T00:30:00Z", "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]),
    # Every half hour through the repeated hour: both passes fire, each once.
    ("*/30 * * * *", "2026-10-24T22:00:00Z", "2026-10-25T04:00:00Z",
     ["2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z", "2026-10-25T01:00:00Z",
      "2026-10-25T01:30:00Z"]),
    # Every quarter hour over the gap: 01:45 CET, then 03:00 CEST.
    ("*/15 * * * *", "2026-03-28T22:00:00Z", "2026-03-29T03:00:00Z",
     ["2026-03-29T00:45:00Z", "2026-03-29T01:00:00Z"]),
])
def test_failovers_over_a_dst_change_fire_every_slot_once_but_a_cut_record(
        cron_text, start, end, must_fire):
    slots = Slots(cron_text, timezone="Europe/Berlin")
    t0, t1 = ts(start), ts(end)
    expected, s = [], slots.next_after(t0)
    while s is not None and s <= t1:
        expected.append(s)
        s = slots.next_after(s)
    # The zone's slots around the change, one after the other (none in a gap, the
    # repeated hour's once or twice as the expression says).
    k = expected.index(ts(must_fire[0]))
    assert expected[k:k + len(must_fire)] == [ts(x) for x in must_fire]
    # Failovers at every slot, in turn right after a confirmed firing (record cut) and
    # a few seconds after the slot (between steps), the DST change's hour included.
    failovers = {slot + (0 if i % 2 == 0 else 7): i % 2 == 0 for i, slot in enumerate(expected)}
    fired, cut = _run_leaders(slots, t0, t1, 5.0, failovers)
    assert sorted(set(fired)) == expected, "a slot was skipped or an unexpected one fired"
    assert cut, "no failover cut a record: the test proves nothing about duplicates"
    # Each cut record gives exactly one duplicate, of that slot (the same message id),
    # fired by the next leader as its first firing; no other slot fires twice.
    twice = sorted(f for f in set(fired) if fired.count(f) > 1)
    assert twice == sorted(cut)
    for f in cut:
        first = fired.index(f)
        assert fired.count(f) == 2 and fired[first + 1] == f


def test_stuck_for_counts_from_the_threads_latest_turn():
    s = schedules.Scheduler(())
    assert s.stuck_for(1e9) == 0.0          # no thread: never stuck
    s.turned_at = 100.0
    assert s.stuck_for(99.0) == 0.0         # a reading taken just before the turn began
    assert s.stuck_for(100.0 + schedules.STUCK_AFTER) == schedules.STUCK_AFTER
    # A confirmed publish within the turn (a catch-up fires up to MAX_FIRE slots in one)
    # is progress: the clock starts again.
    s.published()
    assert s.turned_at != 100.0 and s.stuck_for(s.turned_at + 1.0) == 1.0
