"""Cron expressions and their firing instants, including daylight saving changes."""

import datetime as dt

import pytest

from workqd import cron

UTC = dt.timezone.utc


def u(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def firings(expr: str, tz: str, start: str, n: int) -> list[str]:
    c, z = cron.parse(expr), cron.zone(tz)
    t, out = u(start), []
    for _ in range(n):
        t = c.next_after(t, z)
        out.append(t.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return out


# (expression, zone, start (UTC), the firings after it (UTC)).
TABLE = [
    # Plain fields in UTC.
    ("0 3 * * *", "UTC", "2026-03-01T00:00:00Z", ["2026-03-01T03:00:00Z", "2026-03-02T03:00:00Z"]),
    ("*/20 * * * *", "UTC", "2026-03-01T00:00:00Z",
     ["2026-03-01T00:20:00Z", "2026-03-01T00:40:00Z", "2026-03-01T01:00:00Z"]),
    ("5-7/2 9 * * *", "UTC", "2026-03-01T00:00:00Z", ["2026-03-01T09:05:00Z", "2026-03-01T09:07:00Z",
                                                       "2026-03-02T09:05:00Z"]),
    ("0 0 1 jan,jul *", "UTC", "2026-03-01T00:00:00Z", ["2026-07-01T00:00:00Z",
                                                         "2027-01-01T00:00:00Z"]),
    # Both day fields restricted: either matches (1st of the month or a Monday).
    ("0 12 1 * mon", "UTC", "2026-03-01T00:00:00Z",
     ["2026-03-01T12:00:00Z", "2026-03-02T12:00:00Z", "2026-03-09T12:00:00Z"]),
    # Only the weekday restricted; 7 is Sunday as well as 0.
    ("0 12 * * 7", "UTC", "2026-03-01T12:00:00Z", ["2026-03-08T12:00:00Z"]),
    ("0 0 29 2 *", "UTC", "2026-03-01T00:00:00Z", ["2028-02-29T00:00:00Z"]),
    ("@daily", "UTC", "2026-03-01T00:00:00Z", ["2026-03-02T00:00:00Z"]),
    ("@hourly", "UTC", "2026-03-01T00:30:00Z", ["2026-03-01T01:00:00Z"]),
    # Europe/Berlin, CET (+1) / CEST (+2). 29 March 2026: 02:00 local jumps to 03:00.
    ("0 3 * * *", "Europe/Berlin", "2026-03-27T12:00:00Z",
     ["2026-03-28T02:00:00Z", "2026-03-29T01:00:00Z", "2026-03-30T01:00:00Z"]),
    # Spring forward, fixed time in the gap: fires at the first instant after it (03:00 CEST).
    ("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z",
     ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]),
    # Fixed times 02:00..02:45 all fall in the gap: one firing, at its end.
    ("0,15,30,45 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z",
     ["2026-03-29T01:00:00Z", "2026-03-30T00:00:00Z"]),
    # Wildcard: follows the wall clock, nothing in the gap (01:45 CET then 03:00 CEST).
    ("*/15 * * * *", "Europe/Berlin", "2026-03-29T00:40:00Z",
     ["2026-03-29T00:45:00Z", "2026-03-29T01:00:00Z", "2026-03-29T01:15:00Z"]),
    # Fall back, 25 October 2026: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
    # Fixed time: once, at the first occurrence (02:30 CEST = 00:30 UTC).
    ("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z",
     ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]),
    # Wildcard: both passes of the repeated hour.
    ("30 * * * *", "Europe/Berlin", "2026-10-24T23:00:00Z",
     ["2026-10-24T23:30:00Z", "2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z",
      "2026-10-25T02:30:00Z"]),
    # America/New_York, EST (-5) / EDT (-4). 8 March 2026: 02:00 jumps to 03:00.
    ("30 2 * * *", "America/New_York", "2026-03-07T12:00:00Z",
     ["2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"]),
    ("0 9 * * mon-fri", "America/New_York", "2026-03-06T15:00:00Z",
     ["2026-03-09T13:00:00Z", "2026-03-10T13:00:00Z"]),
    # 1 November 2026: 02:00 EDT becomes 01:00 EST; 01:30 happens twice.
    ("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z",
     ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]),
    ("*/30 1 * * *", "America/New_York", "2026-11-01T05:00:00Z",
     ["2026-11-01T05:30:00Z", "2026-11-01T06:00:00Z", "2026-11-01T06:30:00Z",
      "2026-11-02T06:00:00Z"]),
]


@pytest.mark.parametrize("expr,tz,start,expected", TABLE)
def test_firings(expr, tz, start, expected):
    assert firings(expr, tz, start, len(expected)) == expected


def test_next_is_strictly_after():
    c = cron.parse("0 3 * * *")
    assert c.next_after(u("2026-03-01T03:00:00Z"), UTC) == u("2026-03-02T03:00:00Z")


def test_never_matching_day_gives_none():
    assert cron.parse("0 0 30 2 *").next_after(u("2026-01-01T00:00:00Z"), UTC) is None


def test_wildcard_and_fixed_kinds():
    assert cron.parse("*/5 3 * * *").wildcard
    assert cron.parse("0 * * * *").wildcard
    assert not cron.parse("30 2 * * *").wildcard


@pytest.mark.parametrize("bad", ["", "* * * *", "* * * * * *", "60 * * * *", "* 24 * * *",
                                 "* * 0 * *", "* * * 13 *", "* * * * 8", "5-1 * * * *",
                                 "*/0 * * * *", "a * * * *", "* * * foo *", None, 5,
                                 "1,,2 * * * *"])
def test_bad_expressions(bad):
    with pytest.raises(ValueError):
        cron.parse(bad)


def test_names_and_macros():
    assert cron.parse("0 0 * JAN SUN").months == {1}
    assert cron.parse("0 0 * * sat").weekdays == {6}
    assert cron.parse("@weekly").weekdays == {0}


@pytest.mark.parametrize("bad", ["Mars/Base", "", "../etc/passwd", "/etc/localtime", None])
def test_bad_zones(bad):
    with pytest.raises(ValueError):
        cron.zone(bad)
